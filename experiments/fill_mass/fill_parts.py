"""The fill's kernels alone (CUDA-graph replays, median): the select kernel over 8 rows of 1014 blocks, the stats
and channel-weight kernels, and the mass kernel in two passes against its second pass given the log-sum-exp.
Llama-3 shape, 32K keys, window 64.

    python experiments/fill_mass/fill_parts.py LIB
"""
import sys

import torch

import hierasparse_gen
from hierasparse_gen import ops
from hierasparse_gen.bench import median_us

lib = hierasparse_gen.load(sys.argv[1])
L, S = 32768, 32
k = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16)
q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.float16)
loss = torch.rand(1, 8, L // S, device="cuda")
table = torch.zeros(1, 8, L // S, dtype=torch.int32, device="cuda")
print("select 8 rows x 1014 blocks:", median_us(lambda: ops.select_blocks(lib, k, loss, 2, 1014, 507, L // S, table)), "us")
table2 = torch.zeros_like(table)
print("select, two tables:", median_us(lambda: ops.select_blocks(lib, k, loss, 2, 1014, 507, L // S, table, 254, table2)), "us")
tokens = ops.token_mass(lib, q[:, :, -64:], k, None)
seen = torch.empty(1, 8, L // S, device="cuda")
w = torch.empty(1, 8, L, device="cuda")
print("mass_stats:", median_us(lambda: ops.mass_stats(lib, k, tokens, 64, S, seen=seen, weights=w)), "us")
lse = torch.randn(1, 32, 64, device="cuda")
print("token_mass 2 passes:", median_us(lambda: ops.token_mass(lib, q[:, :, -64:], k, None)), "us")
print("token_mass given lse:", median_us(lambda: ops.token_mass(lib, q[:, :, -64:], k, None, lse)), "us")
print("channel_weights:", median_us(lambda: ops.channel_weights(lib, q[:, :, -64:], 8)), "us")
