"""What the query-aware choice adds to a cache prefill on the GPU (Llama-3 shape, fp16): HieraCache.prefill
of a whole prompt without attention (score, select, fill) by prune loss / magnitudes, and by the default
(attention, query-weighted K), with V's tokens weighted by attention too, and by output error, against the prompt's causal attention (cuDNN SDPA) that a prefill runs anyway.

    PYTHONPATH=. python experiments/quality/fill_cost.py generated/llama3 --length 32768
"""
import argparse

import torch

import hierasparse_gen
from hierasparse_gen.cache import HieraCache


def ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lib")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--profile", action="store_true", help="print the largest GPU kernels of each query-aware fill")
    args = ap.parse_args()
    lib = hierasparse_gen.load(args.lib)
    L = args.length
    k, v = (torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.float16)
    sdpa = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    print(f"{torch.cuda.get_device_name()} L={L}: causal SDPA {sdpa:.2f} ms")
    for name, kw, sel in (("prune loss, magnitudes", dict(selection="prune_loss", key_channels="magnitude"), None),
                          ("attention, query-weighted K, V by magnitude", dict(value_tokens="magnitude"), q),
                          ("attention, query-weighted K, attention-weighted V (the default)", {}, q),
                          ("output error, query-weighted K", dict(selection="output_error"), q)):
        cache = HieraCache(lib, batch=1, num_kv_heads=8, head_dim=128, max_seq_len=L, key_ratio=0.5,
                           value_ratio=0.5, **kw)

        def fill():
            cache.reset()
            cache.prefill(k, v, select_q=sel)
        t = ms(fill)
        print(f"  fill, {name}: {t:.2f} ms = {100 * t / sdpa:.1f} % of the attention")
        if args.profile and sel is not None:  # where the time goes: the largest GPU kernels
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fill()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))


if __name__ == "__main__":
    main()
