"""One default fill of a 32K prompt given the attention's log-sum-exp (Llama-3 shape, ratios 0.5), for Nsight
Compute to profile its kernels:

    ncu --clock-control none -k regex:"compress_[kv]_kernel|mass_pass" -c 3 --section SpeedOfLight \
        python experiments/fill_mass/profile_fill.py LIB
"""
import sys

import torch

import hierasparse_gen
from hierasparse_gen.cache import HieraCache

lib = hierasparse_gen.load(sys.argv[1])
L = 32768
k, v = (torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16) for _ in range(2))
q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.float16)
lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False)[1].reshape(1, 32, L)
cache = HieraCache(lib, batch=1, num_kv_heads=8, head_dim=128, max_seq_len=L, key_ratio=0.5, value_ratio=0.5)
cache.prefill(k, v, select_q=q, select_lse=lse)
torch.cuda.synchronize()
print("filled:", cache.tiers("k").sum().item(), "2:4 K blocks,", cache.tiers("v").sum().item(), "2:4 V blocks")
