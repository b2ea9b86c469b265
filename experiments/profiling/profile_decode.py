"""One decode call (default the Llama-3 shape, B=8, L=32K) for profilers; FORMAT is the stored K/V:
model (2:4 in the model dtype, the default), e4m3 (2:4 e4m3) or dense-e4m3 (flat tensors; a library with those
tiers, specs/llama3_fp8.yaml), or cache-e4m3 (a HieraCache with K and V float8_e4m3 at key and value ratio 1: the
block-table kernel over 2:4 e4m3 blocks and the fp16 sink and window). HQ and HKV: the heads (default 32 and 8).
    ncu --clock-control none -k regex:decode -s 2 -c 2 python experiments/profiling/profile_decode.py BUILD [B L FORMAT HQ HKV]
"""
import sys

import torch

import hierasparse_gen

lib = hierasparse_gen.load(sys.argv[1])
args = sys.argv[2:] + [None] * 5
B, L = int(args[0] or 8), int(args[1] or 32768)
fmt = args[2] or "model"
hq, hkv = int(args[3] or 32), int(args[4] or 8)
k = torch.randn(B, hkv, L, 128, device="cuda", dtype=torch.float16)
q = torch.randn(B, hq, 128, device="cuda", dtype=torch.float16)
if fmt == "cache-e4m3":
    from hierasparse_gen.cache import HieraCache
    cache = HieraCache(lib, batch=B, num_kv_heads=hkv, head_dim=128, max_seq_len=L, key_ratio=1.0, value_ratio=1.0,
                       key_storage="float8_e4m3", value_storage="float8_e4m3")
    cache.prefill(k, k)
    step = lambda: cache.attend(q)  # noqa: E731
else:
    store = {"model": {}, "e4m3": {"storage": "float8_e4m3"},
             "dense-e4m3": {"storage": "float8_e4m3", "sparse": False}}[fmt]
    kc, vc = lib.compress_k(k, **store), lib.compress_v(k, **store)
    step = lambda: lib.decode(q, kc, vc, check_seqlens=False)  # noqa: E731
for _ in range(4):
    out, lse = step()
torch.cuda.synchronize()
print("done", out.float().abs().mean().item())
