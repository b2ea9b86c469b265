"""Decode time against the number of splits, next to the automatic choice (GPU):
    python experiments/tile_sweeps/split_sweep.py generated/llama3
"""
import sys

import torch

import hierasparse_gen
from hierasparse_gen.bench import median_us

lib = hierasparse_gen.load(sys.argv[1])
print("| B | L | splits | us |\n|---|---|---|---|")
for B, L, choices in [(8, 32768, (0, 1, 2, 3, 4, 8)), (1, 131072, (0, 8, 16, 17, 33)),
                      (32, 8192, (0, 1, 2, 4)), (1, 8192, (0, 4, 8, 16, 33)), (8, 131072, (0, 2, 4, 8))]:
    k = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.float16)
    q = torch.randn(B, 32, 128, device="cuda", dtype=torch.float16)
    seqlens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    sets = [(q, lib.compress_k(k), lib.compress_v(k)) for _ in range(3)]
    for s in choices:
        us = median_us(lambda q, kc, vc: lib.decode(q, kc, vc, seqlens, num_splits=s or None,
                                                    check_seqlens=False), sets)
        print(f"| {B} | {L // 1024}K | {s or 'auto'} | {us:.1f} |")
    del sets, k
