"""Where the time of HieraCache.prefill goes (GPU): python experiments/profiling/profile_prefill.py BUILD"""
import sys
import time

import torch

import hierasparse_gen
from hierasparse_gen.cache import HieraCache

lib = hierasparse_gen.load(sys.argv[1])
L = 32768
k = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16)
v = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16)
cache = HieraCache(lib, batch=1, num_kv_heads=8, head_dim=128, max_seq_len=L, key_ratio=0.5, value_ratio=0.5)
for _ in range(3):
    cache.reset()
    cache.prefill(k, v)
torch.cuda.synchronize()
walls, gpus = [], []
for _ in range(10):
    cache.reset()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    a.record()
    cache.prefill(k, v)
    b.record()
    torch.cuda.synchronize()
    walls.append((time.perf_counter() - t0) * 1e3)
    gpus.append(a.elapsed_time(b))
print(f"prefill wall {sorted(walls)[5]:.3f} ms, events {sorted(gpus)[5]:.3f} ms")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
    cache.reset()
    cache.prefill(k, v)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
