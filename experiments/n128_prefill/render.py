"""Render an experiment template (a file beside this script, e.g. wgmma_n128_prefill.cu.j2) with the values of
the library's all-2:4 fp16 sm_90a prefill variant of specs/llama3.yaml: the same namespace, C entry point and
spec header, so the result builds and times beside the library's kernel (benchmarks/wgmma_prefill_variants.py).

    python benchmarks/render_experiment.py benchmarks/wgmma_n128_prefill.cu.j2 out.cu [--stages N]
"""
import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from hierasparse_gen.render import render  # noqa: E402
from hierasparse_gen.spec import load_spec  # noqa: E402
from hierasparse_gen.variants import expand  # noqa: E402


def render_experiment(template: Path, stages: int = 4) -> str:
    spec = load_spec(REPO / "specs" / "llama3.yaml")
    variant = next(v for v in expand(spec) if v.wgmma and v.dtype == "float16" and v.tier.k == "sparse24")
    variant = dataclasses.replace(variant, tiles={**variant.tiles, "stages": stages})
    return render(variant, spec, template)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("template", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--stages", type=int, default=4)
    args = parser.parse_args()
    args.out.write_text(render_experiment(args.template, args.stages))
