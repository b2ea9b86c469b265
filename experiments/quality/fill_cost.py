"""What a cache prefill costs on the GPU (Llama-3 shape, fp16): HieraCache.prefill of a whole prompt without
attention (score, select, fill) by prune loss / magnitudes, by the default (attention, query-weighted K,
attention-weighted V; also given the log-sum-exp that cuDNN's attention returns, as enable()'s prefill passes it)
and by expected error (mass x prune loss), against the prompt's causal attention (cuDNN SDPA) that a prefill
runs anyway. Three figures a fill: its wall time alone (host and device, synchronized); what it adds to a prefill
(the GPU time it spans when queued behind the attention without waiting, as in a model's layer loop: the host's
work hides behind the GPU's unless the fill waits for the stream); with --profile, the
device's kernels.

    PYTHONPATH=. python experiments/quality/fill_cost.py generated/llama3 --length 32768 [--profile]
"""
import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import hierasparse_gen
from hierasparse_gen.cache import HieraCache


def wall_ms(fn, reps=7):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def span_ms(first, then, rounds=8):
    """GPU time from the start to the end of `then` queued behind `first` without waiting (CUDA events around it),
    median over rounds: the host queues `then` while the GPU still runs `first`, as in a model's layer loop, so
    host time shows only where `then` waits for the stream or outruns it."""
    events = []
    for _ in range(rounds + 1):
        first()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        then()
        e1.record()
        events.append((e0, e1))
    torch.cuda.synchronize()
    return sorted(e0.elapsed_time(e1) for e0, e1 in events[1:])[rounds // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lib")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--profile", action="store_true", help="print each fill's GPU kernels")
    args = ap.parse_args()
    lib = hierasparse_gen.load(args.lib)
    L = args.length
    k, v = (torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.float16)

    def attention():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    def attention_lse():  # as enable()'s attend_then_compress prefill runs it: the rows' log-sum-exp too
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)[1]
    sdpa = wall_ms(attention)
    with_lse = wall_ms(attention_lse)
    lse = attention_lse().reshape(1, 32, L)
    print(f"{torch.cuda.get_device_name()} L={L}: causal cuDNN attention {sdpa:.2f} ms; with the rows' "
          f"log-sum-exp {with_lse:.2f} ms")
    for name, kw, sel, sel_lse in (
            ("prune loss, magnitudes", dict(selection="prune_loss", key_channels="magnitude"), None, None),
            ("the default (attention, query-weighted K, attention-weighted V)", {}, q, None),
            ("the default given the attention's log-sum-exp", {}, q, lse),
            ("the default observing the last 32 queries", dict(observe=32), q, None),
            ("expected error given the log-sum-exp, query-weighted K, attention-weighted V",
             dict(selection="expected_error"), q, lse),
            ("expected error given the log-sum-exp, magnitudes", dict(selection="expected_error",
                                                                      key_channels="magnitude",
                                                                      value_tokens="magnitude"), q, lse)):
        cache = HieraCache(lib, batch=1, num_kv_heads=8, head_dim=128, max_seq_len=L, key_ratio=0.5,
                           value_ratio=0.5, **kw)

        def fill():
            cache.reset()
            cache.prefill(k, v, select_q=sel, select_lse=sel_lse)
        t = wall_ms(fill)
        print(f"  fill, {name}: {t:.3f} ms = {100 * t / sdpa:.2f} % of the attention alone")
        span = span_ms(attention if sel_lse is None else attention_lse, fill)
        print(f"    in a prefill (GPU span behind the attention): {span:.3f} ms = {100 * span / sdpa:.2f} %")
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                    torch.profiler.ProfilerActivity.CPU]) as prof:
                fill()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_time_total > 0 and "CUDA" in str(getattr(e, "device_type", ""))]
            busy = sum(e.device_time_total for e in events) / 1e3
            print(f"    device busy {busy:.3f} ms in {sum(e.count for e in events)} kernels; the largest:")
            for e in sorted(events, key=lambda e: -e.device_time_total)[:8]:
                print(f"      {e.device_time_total / 1e3:8.3f} ms x{e.count:<3d} {e.key[:90]}")


if __name__ == "__main__":
    main()
