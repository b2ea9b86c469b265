"""A small decode run for compute-sanitizer (memcheck / racecheck): python gpu_small_case.py BUILD."""
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
