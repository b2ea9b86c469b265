"""Three token_mass calls at the Llama-3 shape (32 query heads over 8 KV heads, window 64, float16) for a profiler:
    ncu -k regex:mass -c 3 python experiments/fill_mass/profile.py BUILD [L]
"""
import sys

import torch

import hierasparse_gen
from hierasparse_gen import ops

lib = hierasparse_gen.load(sys.argv[1])
L = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
q = torch.randn(1, 32, 64, 128, device="cuda", dtype=torch.float16) * 2
k = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16)
for _ in range(2):
    mass = ops.token_mass(lib, q, k, None)
torch.cuda.synchronize()
print("sum", mass.sum().item())
