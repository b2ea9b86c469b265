"""Decode tile sweep: build one library per (warps, stages, chunk_tokens) on the CPU, then
time them all in one GPU run at the Llama-3 shape.

    python experiments/tile_sweeps/tile_sweep.py build   # here: writes generated/sweep/w4s3c32/ ...
    python experiments/tile_sweeps/tile_sweep.py run     # on the GPU: prints a table
    python experiments/tile_sweeps/tile_sweep.py build-mixed / run-mixed   # the HieraCache (mixed-tier) kernel
"""
import sys
from pathlib import Path


CONFIGS = [(4, 3, 32), (4, 2, 32), (2, 3, 32), (2, 4, 32), (8, 2, 32), (4, 2, 64), (2, 2, 64),
           (4, 4, 32), (1, 4, 32), (1, 8, 32)]
MIXED = [(4, 5), (4, 3), (6, 4), (8, 3), (8, 2)]
OUT = Path("generated") / "sweep"  # under the folder it runs in


def tag(w, s, c):
    return f"w{w}s{s}c{c}"


def build():
    from hierasparse_gen.compiler import build as build_spec
    from hierasparse_gen.spec import parse_spec
    for w, s, c in CONFIGS:
        spec = parse_spec({"name": f"sweep-{tag(w, s, c)}", "archs": ["sm_90"], "dtypes": ["float16"],
                           "shapes": [{"head_dim": 128, "num_qo_heads": 32, "num_kv_heads": 8}],
                           "decode": {"warps": w, "stages": s, "chunk_tokens": c}})
        build_spec(spec, OUT / tag(w, s, c), log=None)
        print("built", tag(w, s, c))


def build_mixed():
    from hierasparse_gen.compiler import build as build_spec
    from hierasparse_gen.spec import parse_spec
    for w, s in MIXED:
        spec = parse_spec({"name": f"sweep-mixed-w{w}s{s}", "archs": ["sm_90"], "dtypes": ["float16"],
                           "shapes": [{"head_dim": 128, "num_qo_heads": 32, "num_kv_heads": 8}],
                           "tiers": [{"k": "mixed", "v": "mixed"}], "decode": {"warps": w, "stages": s}})
        build_spec(spec, OUT / f"mixed-w{w}s{s}", log=None)
        print("built", f"mixed-w{w}s{s}")


def run_mixed(B=8, L=32768):
    import torch
    import hierasparse_gen
    from hierasparse_gen.bench import median_us
    from hierasparse_gen.cache import HieraCache
    k = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.float16)
    qs = [torch.randn(B, 32, 128, device="cuda", dtype=torch.float16) for _ in range(2)]
    print("| tiles | key, value ratio | us |\n|---|---|---|")
    for ratio in (1.0, 0.5, 0.0):
        for w, s in MIXED:
            lib = hierasparse_gen.load(OUT / f"mixed-w{w}s{s}")
            caches = []
            for _ in range(2):
                c = HieraCache(lib, batch=B, num_kv_heads=8, head_dim=128, max_seq_len=L, key_ratio=ratio,
                               value_ratio=ratio)
                c.prefill(k, k)
                caches.append(c)
            us = median_us(lambda q, c: c.attend(q), list(zip(qs, caches)))
            out = caches[0].attend(qs[0])[0].float()
            first = out if (w, s) == MIXED[0] else first
            diff = (out - first).abs().max().item()  # every tiling computes the same function
            print(f"| w{w}s{s} | {ratio} | {us:.1f} | max diff to w{MIXED[0][0]}s{MIXED[0][1]}: {diff:.1e} |")
            del caches


def run(batches=(8, 1), lengths=(32768, 131072)):
    import torch
    import hierasparse_gen
    from hierasparse_gen.bench import median_us
    print("| tiles | B | L | splits | us | TB/s |")
    print("|---|---|---|---|---|---|")
    for B, L in zip(batches, lengths):
        k = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.float16)
        q = torch.randn(B, 32, 128, device="cuda", dtype=torch.float16)
        seqlens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        for w, s, c in CONFIGS:
            lib = hierasparse_gen.load(OUT / tag(w, s, c))
            sets = [(q, lib.compress_k(k), lib.compress_v(k)) for _ in range(2)]
            us = median_us(lambda q, kc, vc: lib.decode(q, kc, vc, seqlens, check_seqlens=False), sets)
            moved = sets[0][1].nbytes() + sets[0][2].nbytes()
            print(f"| {tag(w, s, c)} | {B} | {L // 1024}K | auto | {us:.1f} | {moved / us / 1e6:.2f} |")
            for splits in (8, 16, 32):
                us = median_us(lambda q, kc, vc: lib.decode(q, kc, vc, seqlens, num_splits=splits,
                                                            check_seqlens=False), sets)
                print(f"| {tag(w, s, c)} | {B} | {L // 1024}K | {splits} | {us:.1f} | {moved / us / 1e6:.2f} |")
            del sets
        del k


if __name__ == "__main__":
    {"build": build, "run": run, "build-mixed": build_mixed, "run-mixed": run_mixed}[sys.argv[1]]()
