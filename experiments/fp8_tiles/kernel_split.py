"""Where a block-table decode step's time goes: the device time of each kernel of HieraCache.attend (the decode
grid, the split combine) under torch.profiler, next to the step's CUDA-graph time and the byte model's time at
cuDNN's bandwidth in the same run. Llama-3 shape, B=8, L=32K, e4m3 K and V unless --storage says otherwise.

    python experiments/fp8_tiles/kernel_split.py BUILD [--cells 1/1,0.75/1,0.5/0.5,0/0]
"""
import argparse

import torch
from torch.nn.attention import SDPBackend

import hierasparse_gen
from hierasparse_gen.bench import _sdpa, median_us
from hierasparse_gen.cache import HieraCache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--cells", default="1/1,0.75/1,0.5/0.5,0/0", help="key/value ratio pairs")
    ap.add_argument("--storage", default="float8_e4m3/float8_e4m3")
    args = ap.parse_args()
    lib = hierasparse_gen.load(args.build)
    ks, vs = args.storage.split("/")
    B, L, hq, hkv, d = 8, 32768, 32, 8, 128
    k, v = (torch.randn(B, hkv, L, d, device="cuda", dtype=torch.float16) for _ in range(2))
    qs = [torch.randn(B, hq, d, device="cuda", dtype=torch.float16) for _ in range(2)]
    # the baseline as `hierasparse-gen bench --cache` times it
    cudnn = median_us(_sdpa(SDPBackend.CUDNN_ATTENTION), [(q.unsqueeze(2), k, v) for q in qs], 30)
    print(f"{torch.cuda.get_device_name()}: B={B} L={L} storage {args.storage}; cuDNN fp16 dense {cudnn:.1f} us\n")
    print("| key / value ratio | step us | of the byte model | kernels (device us a step) |\n|---|---|---|---|")
    for cell in args.cells.split(","):
        kr, vr = map(float, cell.split("/"))
        caches = [HieraCache(lib, batch=B, num_kv_heads=hkv, head_dim=d, max_seq_len=L, key_ratio=kr,
                             value_ratio=vr, key_storage=ks, value_storage=vs) for _ in range(2)]
        for c in caches:  # two caches so consecutive steps do not hit L2
            c.prefill(k, v)
        step = median_us(lambda q, c: c.attend(q), list(zip(qs, caches)), 30)
        nb = caches[0].nbytes()
        model = nb["dense_equivalent"] / (nb["total"] - nb["table"])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(20):
                caches[i % 2].attend(qs[i % 2])
            torch.cuda.synchronize()
        kern = [(e.key, e.device_time_total / 20) for e in prof.key_averages() if e.device_time_total > 0]
        kern = ", ".join(f"{name[:48]} {us:.1f}" for name, us in sorted(kern, key=lambda x: -x[1]))
        print(f"| {kr:g} / {vr:g} | {step:.1f} | {100 * cudnn / step / model:.0f} % | {kern} |", flush=True)
        del caches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
