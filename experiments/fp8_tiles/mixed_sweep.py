"""Block-table (HieraCache) e4m3 decode tile sweep: one library per (warps, ring stages) with the mixed e4m3 tier
(Llama-3 shape, float16), built on the CPU, timed on the GPU against cuDNN and the byte model.

    python experiments/fp8_tiles/mixed_sweep.py build        # writes generated/fp8-mixed-sweep/w8s2/ ...
    python experiments/fp8_tiles/mixed_sweep.py run [B] [L]  # on the GPU: a table
"""
import sys
from pathlib import Path

TIER = {"k": "mixed", "v": "mixed", "k_storage": "float8_e4m3", "v_storage": "float8_e4m3"}
# (warps, stages): a warp's ring holds stages x 2 fp16 2:4 chunks (kRing), i.e. ~3.5 e4m3 2:4 chunks a stage pair;
# 4 x 2 leaves room for three CTAs an SM (given the splits)
CONFIGS = [(8, 2), (8, 3), (6, 3), (6, 4), (4, 4), (4, 6), (4, 2)]
SPLITS = (None, 4, 6)  # None: the split heuristic's (2 at B=8 with 8 KV heads: 128 CTAs)
RATIOS = [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)]
OUT = Path("generated") / "fp8-mixed-sweep"


def tag(w, s):
    return f"w{w}s{s}"


def _spec(w, s):
    return {"name": f"fp8-mixed-{tag(w, s)}", "archs": ["sm_90"], "dtypes": ["float16"], "phases": ["decode"],
            "shapes": [{"head_dim": 128, "num_qo_heads": 32, "num_kv_heads": 8}], "tiers": [TIER],
            "decode": {"warps": w, "stages": s}}


def build():
    from hierasparse_gen.compiler import build as build_spec
    from hierasparse_gen.errors import SpecError
    from hierasparse_gen.spec import parse_spec
    for w, s in CONFIGS:
        try:
            build_spec(parse_spec(_spec(w, s)), OUT / tag(w, s), log=None)
            print("built", tag(w, s))
        except SpecError as e:  # stages that do not fit shared memory
            print(f"skip {tag(w, s)}: {str(e)[:100]}")


def run(B=8, L=32768):
    import torch
    from torch.nn.attention import SDPBackend
    import hierasparse_gen
    from hierasparse_gen.bench import _sdpa, median_us
    from hierasparse_gen.cache import HieraCache
    print(torch.cuda.get_device_name(), f"B={B} L={L}, K and V float8_e4m3\n")
    k, v = (torch.randn(B, 8, L, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    qs = [torch.randn(B, 32, 128, device="cuda", dtype=torch.float16) for _ in range(2)]
    cudnn = median_us(_sdpa(SDPBackend.CUDNN_ATTENTION), [(q.unsqueeze(2), k, v) for q in qs], 20)
    print(f"cuDNN fp16 dense {cudnn:.1f} us\n")
    print("| tiles | key ratio | value ratio | splits | us | vs cuDNN | byte model | of model |\n|---|---|---|---|---|---|---|---|")
    for w, st in CONFIGS:
        path = OUT / tag(w, st)
        if not path.exists():
            continue
        lib = hierasparse_gen.load(path)
        for kr, vr in RATIOS:
            caches = []
            for _ in range(2):  # two caches so consecutive calls do not hit L2
                c = HieraCache(lib, batch=B, num_kv_heads=8, head_dim=128, max_seq_len=L, key_ratio=kr,
                               value_ratio=vr, key_storage="float8_e4m3", value_storage="float8_e4m3")
                c.prefill(k, v)
                caches.append(c)
            nb = caches[0].nbytes()
            model = nb["dense_equivalent"] / (nb["total"] - nb["table"])
            for splits in SPLITS:
                us = median_us(lambda q, c: c.attend(q, num_splits=splits), list(zip(qs, caches)), 20)
                print(f"| {tag(w, st)} | {kr} | {vr} | {splits or 'auto'} | {us:.1f} | {cudnn / us:.2f}x | "
                      f"{model:.2f}x | {100 * cudnn / us / model:.0f} % |", flush=True)
            del caches
            torch.cuda.empty_cache()


if __name__ == "__main__":
    {"build": build, "run": lambda: run(*map(int, sys.argv[2:]))}[sys.argv[1]]()
