"""Render wgmma_n128_prefill.cu.j2 (beside this file) with the values of the all-2:4 fp16 sm_90a prefill
variant of a spec (default specs/llama3.yaml): the same namespace, C entry point and spec header as the
library's kernel, so the result builds and times beside it
(experiments/prefill_sm90_edits/wgmma_prefill_variants.py with CORE_LAYOUT=).

    python experiments/n128_prefill/render.py out.cu [--stages N] [--spec specs/llama3.yaml]

Run from the repository with the package installed. The template includes the library's `common.cuh.j2`
(the spec header, the export macro), so it is rendered with Jinja2 here, looking in this folder first and
then in the package's templates folder; the package's own render() knows only the library's templates. Its
`#include "sm90/ptx.cuh"` is inlined as the library's build does (one self-contained source).
"""
import argparse
import dataclasses
from pathlib import Path

import jinja2

import hierasparse_gen
from hierasparse_gen.render import inline_headers, templates_dir
from hierasparse_gen.spec import load_spec
from hierasparse_gen.variants import expand

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "wgmma_n128_prefill.cu.j2"


def render_experiment(stages: int = 4, spec_path: Path = Path("specs/llama3.yaml")) -> str:
    spec = load_spec(spec_path)
    variant = next(v for v in expand(spec) if v.wgmma and v.dtype == "float16" and v.tier.k == "sparse24")
    variant = dataclasses.replace(variant, tiles={**variant.tiles, "stages": stages})
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([str(HERE), str(templates_dir())]),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return inline_headers(env.get_template(TEMPLATE.name).render(
        variant=variant, spec=spec, template=f"experiments/n128_prefill/{TEMPLATE.name}",
        generator_version=hierasparse_gen.__version__, namespace=f"{variant.name}_impl", symbol=variant.symbol,
        head_dim=variant.head_dim, group=variant.group, stages=stages, k8=False, v8=False), templates_dir())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--spec", type=Path, default=Path("specs/llama3.yaml"))
    args = parser.parse_args()
    args.out.write_text(render_experiment(args.stages, args.spec))
