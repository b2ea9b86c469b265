"""Decode tiles at the tensor-parallel shapes: one KV head a GPU with GQA groups 8 and 16 (Llama-3.1-70B /
405B at TP=8), head_dim 128, float16: one library per (warps, stages, chunk_tokens), timed in one GPU run
with forced split counts beside cuDNN. ``llama3``: the same at the one-GPU Llama-3 shape (group 4, 8 KV
heads), for the tiles that came out best.

    python experiments/tile_sweeps/gqa_sweep.py build [tp|llama3]   # writes generated/gqa-sweep/...
    python experiments/tile_sweeps/gqa_sweep.py run [tp|llama3]     # on the GPU: a table
"""
import sys
from pathlib import Path

SETS = {  # name -> ((group, KV heads), ...), tilings
    "tp": (((8, 1), (16, 1)), [(4, 3, 32), (8, 2, 32), (8, 3, 32), (4, 2, 64), (2, 4, 32)]),
    "llama3": (((4, 8),), [(4, 3, 32), (8, 2, 32), (8, 3, 32)]),
}
OUT = Path("generated") / "gqa-sweep"


def tag(w, s, c):
    return f"w{w}s{s}c{c}"


def build(which="tp"):
    from hierasparse_gen.compiler import build as build_spec
    from hierasparse_gen.spec import parse_spec
    shapes, configs = SETS[which]
    for w, s, c in configs:
        spec = parse_spec({"name": f"gqa-sweep-{which}-{tag(w, s, c)}", "archs": ["sm_90"], "dtypes": ["float16"],
                           "phases": ["decode"], "shapes": [{"head_dim": 128, "num_qo_heads": g * h, "num_kv_heads": h}
                                                            for g, h in shapes],
                           "decode": {"warps": w, "stages": s, "chunk_tokens": c}})
        build_spec(spec, OUT / which / tag(w, s, c), log=None)
        print("built", which, tag(w, s, c))


def run(which="tp"):
    import torch
    import hierasparse_gen
    from hierasparse_gen.bench import median_us
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print(torch.cuda.get_device_name())
    print("| group | B | L | tiles | splits | us | vs cuDNN |\n|---|---|---|---|---|---|---|")
    shapes, configs = SETS[which]
    for g, h in shapes:
        for B, L in ((1, 32768), (1, 131072), (8, 32768)):
            raw = [(torch.randn(B, g * h, 128, device="cuda", dtype=torch.float16),
                    torch.randn(B, h, L, 128, device="cuda", dtype=torch.float16),
                    torch.randn(B, h, L, 128, device="cuda", dtype=torch.float16)) for _ in range(4)]

            def cudnn(q, k, v):
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)
            base = median_us(cudnn, raw)
            print(f"| {g} | {B} | {L // 1024}K | cuDNN | - | {base:.1f} | 1.00x |")
            seqlens = torch.full((B,), L, dtype=torch.int32, device="cuda")
            for w, s, c in configs:
                lib = hierasparse_gen.load(OUT / which / tag(w, s, c))
                sets = [(q, lib.compress_k(k), lib.compress_v(v)) for q, k, v in raw]
                for splits in (None, 16, 32, 64, 128) if B * h == 1 else (None, 2, 4, 8, 16, 32):
                    us = median_us(lambda q, kc, vc: lib.decode(q, kc, vc, seqlens, num_splits=splits,
                                                                check_seqlens=False), sets)
                    print(f"| {g} | {B} | {L // 1024}K | {tag(w, s, c)} | {splits or 'auto'} | {us:.1f} | "
                          f"{base / us:.2f}x |", flush=True)
                del sets


if __name__ == "__main__":
    {"build": build, "run": run}[sys.argv[1]](*sys.argv[2:])
