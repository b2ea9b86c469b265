"""Block-table (HieraCache) e4m3 decode tile sweep: one library per (warps, ring stages) with the mixed e4m3 tier
(Llama-3 shape, float16), built on the CPU, timed on the GPU against cuDNN and the byte model.

    python experiments/fp8_tiles/mixed_sweep.py build        # writes generated/fp8-mixed-sweep/w8s2/ ...
    python experiments/fp8_tiles/mixed_sweep.py run [B] [L]  # on the GPU: a table
"""
import sys
from pathlib import Path

TIER = {"k": "mixed", "v": "mixed", "k_storage": "float8_e4m3", "v_storage": "float8_e4m3"}
# (warps, stages): a warp's ring holds stages x 2 fp16 2:4 chunks (kRing), i.e. ~3.5 e4m3 2:4 chunks a stage pair
CONFIGS = [(8, 2), (8, 3), (6, 3), (6, 4), (4, 4), (4, 6)]
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
    import hierasparse_gen
    from hierasparse_gen.bench import bench_cache_ratios
    print(torch.cuda.get_device_name(), f"B={B} L={L}, K and V float8_e4m3\n")
    print("| tiles | key ratio | value ratio | us | vs cuDNN | byte model | of model |\n|---|---|---|---|---|---|---|")
    for w, s in CONFIGS:
        path = OUT / tag(w, s)
        if not path.exists():
            continue
        lib = hierasparse_gen.load(path)
        for kr, vr in RATIOS:
            rows, cudnn = bench_cache_ratios(lib, ratios=(kr,) if kr == vr else (kr, vr), B=B, L=L,
                                             storage=("float8_e4m3", "float8_e4m3"))
            r = next(r for r in rows if (r["kr"], r["vr"]) == (kr, vr))
            print(f"| {tag(w, s)} | {kr} | {vr} | {r['us']:.1f} | {r['speedup']:.2f}x | {r['model']:.2f}x | "
                  f"{100 * r['speedup'] / r['model']:.0f} % |", flush=True)


if __name__ == "__main__":
    {"build": build, "run": lambda: run(*map(int, sys.argv[2:]))}[sys.argv[1]]()
