"""e4m3 decode tile sweep: one library per (warps, stages, chunk_tokens) with the 2:4 e4m3 and dense e4m3
flat tiers (Llama-3 shape, float16), built on the CPU, timed in one GPU run beside cuDNN.

    python experiments/fp8_tiles/sweep.py build        # writes generated/fp8-sweep/w4s3c32/ ...
    python experiments/fp8_tiles/sweep.py run [B] [L]  # on the GPU: a table
"""
import sys
from pathlib import Path

E4M3 = {"k_storage": "float8_e4m3", "v_storage": "float8_e4m3"}
TIERS = {"2:4 e4m3": {"k": "sparse24", "v": "sparse24", **E4M3}, "dense e4m3": {"k": "dense", "v": "dense", **E4M3}}
# (warps, stages, chunk_tokens); the tiers whose stages fit 227 KB are built
CONFIGS = [(4, 3, 32), (4, 4, 32), (4, 6, 32), (2, 8, 32), (8, 2, 32), (8, 3, 32), (4, 2, 64), (4, 3, 64),
           (4, 4, 64), (4, 8, 32)]
OUT = Path("generated") / "fp8-sweep"


def tag(w, s, c):
    return f"w{w}s{s}c{c}"


def build():
    from hierasparse_gen.compiler import build as build_spec
    from hierasparse_gen.errors import SpecError
    from hierasparse_gen.spec import parse_spec
    from hierasparse_gen.variants import expand
    for w, s, c in CONFIGS:
        tiers = []
        for name, t in TIERS.items():
            try:  # a tiling too big for one tier's stages is left out for that tier
                expand(parse_spec(_spec(w, s, c, [t])))
                tiers.append(t)
            except SpecError as e:
                print(f"skip {tag(w, s, c)} {name}: {str(e)[:80]}")
        if tiers:
            build_spec(parse_spec(_spec(w, s, c, tiers)), OUT / tag(w, s, c), log=None)
            print("built", tag(w, s, c), len(tiers), "tiers")


def _spec(w, s, c, tiers):
    return {"name": f"fp8-sweep-{tag(w, s, c)}", "archs": ["sm_90"], "dtypes": ["float16"], "phases": ["decode"],
            "shapes": [{"head_dim": 128, "num_qo_heads": 32, "num_kv_heads": 8}], "tiers": tiers,
            "decode": {"warps": w, "stages": s, "chunk_tokens": c}}


def run(B=8, L=32768):
    import torch
    import hierasparse_gen
    from hierasparse_gen.bench import median_us
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print(torch.cuda.get_device_name(), f"B={B} L={L}")
    raw = [(torch.randn(B, 32, 128, device="cuda", dtype=torch.float16),
            torch.randn(B, 8, L, 128, device="cuda", dtype=torch.float16)) for _ in range(3)]

    def cudnn(q, k):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, k, enable_gqa=True)
    base = median_us(cudnn, raw)
    print(f"cuDNN fp16 dense: {base:.1f} us\n\n| tiles | format | splits | us | vs cuDNN | TB/s |\n|---|---|---|---|---|---|")
    seqlens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    for w, s, c in CONFIGS:
        path = OUT / tag(w, s, c)
        if not path.exists():
            continue
        lib = hierasparse_gen.load(path)
        for name, t in TIERS.items():
            sparse = t["k"] == "sparse24"
            try:
                sets = [(q, lib.compress_k(k, storage="float8_e4m3", sparse=sparse),
                         lib.compress_v(k, storage="float8_e4m3", sparse=sparse)) for q, k in raw]
            except Exception as e:  # a tier this tiling did not build
                print(f"| {tag(w, s, c)} | {name} | - | - | {type(e).__name__} |")
                continue
            moved = sets[0][1].nbytes() + sets[0][2].nbytes()
            for splits in (None, 4, 8):  # None: the launch heuristic
                us = median_us(lambda q, kc, vc: lib.decode(q, kc, vc, seqlens, num_splits=splits,
                                                            check_seqlens=False), sets)
                print(f"| {tag(w, s, c)} | {name} | {splits or 'auto'} | {us:.1f} | {base / us:.2f}x | "
                      f"{moved / us / 1e6:.2f} |")
            del sets


if __name__ == "__main__":
    {"build": build, "run": lambda: run(*map(int, sys.argv[2:]))}[sys.argv[1]]()
