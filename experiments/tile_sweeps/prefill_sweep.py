"""Prefill tile sweep: build one library per prefill tile choice on the CPU, then time the
all-2:4 and balanced kernels of each in one GPU run at the Llama-3 shape (causal, B=1), with
cuDNN in the same run.

    python experiments/tile_sweeps/prefill_sweep.py build   # here: writes generated/prefill-sweep/<tag>/
    python experiments/tile_sweeps/prefill_sweep.py run     # on the GPU: prints a table
"""
import sys
from pathlib import Path


# (warp_queries, stages, chunk_tokens, step_keys)
CONFIGS = [(24, 3, 64, 32), (24, 3, 128, 32), (24, 2, 128, 32), (16, 3, 128, 32), (24, 2, 128, 64)]
OUT = Path("generated") / "prefill-sweep"  # under the folder it runs in


def tag(q, s, c, k):
    return f"q{q}s{s}c{c}k{k}"


def build():
    from hierasparse_gen.compiler import build as build_spec
    from hierasparse_gen.spec import parse_spec
    for cfg in CONFIGS:
        q, s, c, k = cfg
        spec = parse_spec({"name": f"psweep-{tag(*cfg)}", "archs": ["sm_90"], "dtypes": ["float16"],
                           "phases": ["prefill"],
                           "shapes": [{"head_dim": 128, "num_qo_heads": 32, "num_kv_heads": 8}],
                           "prefill": {"warp_queries": q, "stages": s, "chunk_tokens": c, "step_keys": k}})
        build_spec(spec, OUT / tag(*cfg), log=None)
        print("built", tag(*cfg))


def run(lengths=(8192, 32768)):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    import hierasparse_gen
    from hierasparse_gen.bench import median_us
    print("| tiles (queries/warp, stages, stage keys, step keys) | S | all-2:4 TFLOP/s | balanced TFLOP/s | cuDNN TFLOP/s |")
    print("|---|---|---|---|---|")
    for L in lengths:
        q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.float16)
        k = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16)
        v = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16)
        flops = 4 * 32 * L * L * 128 / 2
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = median_us(lambda q: sdpa(q, k, v, is_causal=True, enable_gqa=True), [(q,)], 5)
        for cfg in CONFIGS:
            lib = hierasparse_gen.load(OUT / tag(*cfg))
            kc, vc = lib.compress_k(k), lib.compress_v(v)
            a = median_us(lambda q: lib.prefill(q, kc, vc), [(q,)], 5)
            b = median_us(lambda q: lib.prefill(q, k, vc), [(q,)], 5)
            print(f"| {cfg} | {L // 1024}K | {flops / a / 1e6:.0f} | {flops / b / 1e6:.0f} | {flops / cudnn / 1e6:.0f} |",
                  flush=True)


if __name__ == "__main__":
    {"build": build, "run": run}[sys.argv[1]]()
