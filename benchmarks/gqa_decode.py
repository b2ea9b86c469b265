"""Decode speed at the shapes one GPU sees under tensor parallelism with one KV head a rank: GQA group 8
(Llama-3.1-70B at TP=8) and 16 (Llama-3.1-405B at TP=8), head_dim 128, against cuDNN and flash SDPA in the
same run; and the HieraCache key/value-ratio grid at those shapes. Needs a build of specs/llama3_tp8.yaml.

    hierasparse-gen build specs/llama3_tp8.yaml
    python benchmarks/gqa_decode.py generated/llama3-tp8 --groups 8 16 --batch 1 8 32 --length 32768 131072
    python benchmarks/gqa_decode.py generated/llama3-tp8 --batch 8 --length 32768 --cache --prefill 8192 32768

The tables have the columns of ``hierasparse-gen bench`` (same timing method: CUDA-event medians of
graph replays, inputs rotated past the L2).
"""

from __future__ import annotations

import argparse

import torch

import hierasparse_gen
from hierasparse_gen.bench import bench_cache_ratios, bench_decode, bench_prefill, format_prefill, format_table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", help="build folder of specs/llama3_tp8.yaml (or the spec, built first)")
    ap.add_argument("--groups", type=int, nargs="+", default=[8, 16], help="query heads per KV head")
    ap.add_argument("--kv-heads", type=int, default=1, help="KV heads a GPU holds")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--length", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--cache", action="store_true", help="also the HieraCache ratio grid (B=8, L=32K)")
    ap.add_argument("--prefill", type=int, nargs="*", metavar="S",
                    help="also causal prefill of prompts of these lengths (batch: --prefill-batch)")
    ap.add_argument("--prefill-batch", type=int, default=4)
    args = ap.parse_args(argv)
    lib = hierasparse_gen.load(args.build)
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}")
    for g in args.groups:
        hq, hkv = g * args.kv_heads, args.kv_heads
        print(f"\n## group {g}: {hq} query heads, {hkv} KV head(s), head_dim 128, all-2:4 K and V\n")
        rows, bw = bench_decode(lib, args.batch, args.length, dtype, hq=hq, hkv=hkv)
        print(format_table(rows, bw), flush=True)
        if args.cache:
            rows, cudnn = bench_cache_ratios(lib, hq=hq, hkv=hkv, dtype=dtype)
            print(f"\nHieraCache decode, group {g}, B=8, L=32K; cuDNN dense {cudnn:.1f} us")
            print("| key ratio | value ratio | us | speedup vs cuDNN | byte model | TB/s |")
            print("|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['kr']:.2f} | {r['vr']:.2f} | {r['us']:.1f} | {r['speedup']:.2f}x | {r['model']:.2f}x | "
                      f"{r['tbps']:.2f} |", flush=True)
        if args.prefill:
            print(f"\nPrefill, group {g}, B={args.prefill_batch}")
            print(format_prefill(bench_prefill(lib, (args.prefill_batch,), args.prefill, hq=hq, hkv=hkv, dtype=dtype)),
                  flush=True)


if __name__ == "__main__":
    main()
