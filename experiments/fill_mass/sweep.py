"""Tiles of the observation-window mass kernel (templates/cache/mass.cuh): warps a CTA x keys a CTA x query
columns a warp (n8 tiles), each built from a patched copy of the templates (Llama-3 shape, float16), timed on the
GPU at a 32K prompt against float64.

    python experiments/fill_mass/sweep.py build        # generated/fill-mass/w4k256n4 ...
    python experiments/fill_mass/sweep.py run [L]      # on the GPU: a table
"""
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

CONFIGS = [(4, 256, 4), (4, 256, 2), (4, 128, 2), (8, 128, 2), (8, 256, 2)]  # warps, keys, query n8 tiles
OUT = Path("generated") / "fill-mass"


def tag(w, keys, n8):
    return f"w{w}k{keys}n{n8}"


def build():
    from hierasparse_gen.compiler import build as build_spec
    from hierasparse_gen.render import templates_dir
    from hierasparse_gen.spec import parse_spec
    src = templates_dir()
    for w, keys, n8 in CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / "templates"
            shutil.copytree(src, dst)
            header = dst / "cache" / "mass.cuh"
            text = header.read_text()
            text = re.sub(r"constexpr int kMassWarps = \d+;", f"constexpr int kMassWarps = {w};", text)
            text = re.sub(r"constexpr int kMassKeys = [^;]+;", f"constexpr int kMassKeys = {keys};", text)
            text = re.sub(r"constexpr int kMassN8 = [^;]+;", f"constexpr int kMassN8 = {n8};", text)
            header.write_text(text)
            os.environ["HIERASPARSE_TEMPLATES"] = str(dst)
            spec = {"name": f"fill-mass-{tag(w, keys, n8)}", "archs": ["sm_90"], "dtypes": ["float16"],
                    "phases": ["decode"], "shapes": [{"head_dim": 128, "num_qo_heads": 32, "num_kv_heads": 8}],
                    "tiers": [{"k": "sparse24", "v": "sparse24"}]}
            build_spec(parse_spec(spec), OUT / tag(w, keys, n8), log=None)
            print("built", tag(w, keys, n8), flush=True)


def run(L=32768):
    import torch
    import hierasparse_gen
    from hierasparse_gen import ops
    from hierasparse_gen.bench import median_us
    print(torch.cuda.get_device_name(), f"L={L}, 32 query heads over 8 KV heads, window 64, float16\n")
    q = torch.randn(1, 32, 64, 128, device="cuda", dtype=torch.float16) * 2
    k = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16)
    scores = torch.einsum("bhgwd,bhld->bhgwl", q.double().view(1, 8, 4, 64, 128), k.double()) / 128 ** 0.5
    late = torch.arange(L, device="cuda").view(1, L) > torch.arange(L - 64, L, device="cuda").view(64, 1)
    want = torch.softmax(scores.masked_fill(late, float("-inf")), -1).sum((2, 3)).float()
    del scores
    print("| tiles | us | max rel. diff vs float64 (masses over 1e-3) |\n|---|---|---|")
    for path in sorted(p for p in OUT.iterdir() if (p / "manifest.json").exists()):
        lib = hierasparse_gen.load(path)
        got = ops.token_mass(lib, q, k, None)
        us = median_us(lambda: ops.token_mass(lib, q, k, None), iters=20)
        big = want > 1e-3
        diff = ((got - want).abs()[big] / want[big]).max().item()
        print(f"| {path.name} | {us:.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    {"build": build, "run": lambda: run(*map(int, sys.argv[2:]))}[sys.argv[1]]()
