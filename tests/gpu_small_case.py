"""Small decode and prefill runs for compute-sanitizer (memcheck / racecheck): python gpu_small_case.py BUILD."""
import sys

import torch

import hierasparse_gen

lib = hierasparse_gen.load(sys.argv[1])
for dtype in (torch.float16, torch.bfloat16):
    k = torch.randn(3, 8, 197, 128, device="cuda", dtype=dtype)
    v = torch.randn(3, 8, 197, 128, device="cuda", dtype=dtype)
    q = torch.randn(3, 32, 128, device="cuda", dtype=dtype)
    kc, vc = lib.compress_k(k), lib.compress_v(v)
    seqlens = torch.tensor([197, 1, 64], dtype=torch.int32, device="cuda")
    for splits in (1, 3):
        out, lse = lib.decode(q, kc, vc, seqlens, num_splits=splits)
torch.cuda.synchronize()
print("ok", out.float().abs().mean().item())

# the hierarchical cache: prefill, appends through two flushes, mixed-tier decode
from hierasparse_gen.cache import HieraCache  # noqa: E402

cache = HieraCache(lib, batch=2, num_kv_heads=8, head_dim=128, max_seq_len=640, key_ratio=0.5, value_ratio=1.0)
kk = torch.randn(2, 8, 640, 128, device="cuda", dtype=torch.float16)
cache.prefill(kk[:, :, :450], kk[:, :, :450], [450, 300])
for step in range(130):
    cache.append(kk[:, :, 450 + step % 100], kk[:, :, 450 + step % 100])
    if step % 40 == 0:
        out, lse = cache.attend(torch.randn(2, 32, 128, device="cuda", dtype=torch.float16), num_splits=3)
torch.cuda.synchronize()
print("cache ok", cache.lengths, out.float().abs().mean().item())

# prefill: all-2:4 and balanced over flat tensors (ragged lengths, right padding), then the
# block-table kernel in every mode, with chunks that start off the 32-token grid
for dtype in (torch.float16, torch.bfloat16):
    k = torch.randn(2, 8, 333, 128, device="cuda", dtype=dtype)
    q = torch.randn(2, 32, 200, 128, device="cuda", dtype=dtype)
    kc, vc = lib.compress_k(k), lib.compress_v(k)
    seqlens = torch.tensor([333, 90], dtype=torch.int32, device="cuda")
    qlens = torch.tensor([200, 77], dtype=torch.int32, device="cuda")
    out, lse = lib.prefill(q, kc, vc, seqlens, qlens=qlens)
    out, lse = lib.prefill(q, k, vc, seqlens)
for mode in ("attend_then_compress", "compress_then_attend", "balanced"):
    cache = HieraCache(lib, batch=2, num_kv_heads=8, head_dim=128, max_seq_len=1024, key_ratio=0.5,
                       value_ratio=0.5)
    for n in ((333, 100), (400, 17)):
        L = max(n)
        cache.prefill(kk[:, :, :L], kk[:, :, :L], list(n), q=torch.randn(2, 32, L, 128, device="cuda",
                                                                           dtype=torch.float16), mode=mode)
torch.cuda.synchronize()
print("prefill ok", cache.lengths)
