"""Command line: ``hierasparse-gen build | list | clean | bench | eval``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import SpecError


def _err(msg: str) -> int:
    print(f"hierasparse-gen: error: {msg}", file=sys.stderr)
    return 2


def cmd_build(args) -> int:
    from .compiler import CompileError, ToolchainError, build, build_dir
    from .spec import find_spec_file, load_spec
    try:
        path = find_spec_file(args.spec, log=print)
        spec = load_spec(path)
        out = Path(args.out) if args.out else build_dir(spec)
        print(f"building {spec.name} ({path}) into {out}")
        report = build(spec, out_dir=out, jobs=args.jobs)
    except (SpecError, ToolchainError, CompileError) as e:
        return _err(str(e))
    width = max(len(bv.variant.name) for bv in report.variants)
    print()
    print(f"{'variant':<{width}}  {'arch':<6} {'dtype':<9} {'hash':<12} status")
    for bv in report.variants:
        status = f"compiled {bv.seconds:.1f}s" if bv.compiled else "up to date"
        print(f"{bv.variant.name:<{width}}  {bv.variant.arch:<6} {bv.variant.dtype:<9} {bv.hash[:12]} {status}")
    print()
    print(f"{len(report.compiled)} compiled, {len(report.variants) - len(report.compiled)} up to date; "
          f"library {report.library} ({'linked' if report.linked else 'unchanged'}); "
          f"manifest {report.manifest}; {report.seconds:.1f}s")
    return 0


def _list_shipped() -> int:
    from .spec import load_spec, shipped_specs
    print("specs shipped with hierasparse-gen (build one from any folder: hierasparse-gen build specs/<name>.yaml):")
    for name, path in shipped_specs().items():
        try:
            spec = load_spec(path)
            what = f"{len(spec.shapes)} shape(s), {', '.join(spec.archs)}, {', '.join(spec.phases)}"
        except SpecError as e:
            what = f"invalid: {e}"
        print(f"  {name:<16} {what}  ({path})")
    return 0


def cmd_list(args) -> int:
    from .compiler import MANIFEST
    if args.dir is None:
        return _list_shipped()
    path = Path(args.dir)
    manifest = path / MANIFEST if path.is_dir() else path
    try:
        data = json.loads(manifest.read_text())
        lines = [f"{data['spec']['name']}: {data['library']} (nvcc {data['tools']['nvcc']}, "
                 f"CUTLASS {data['tools']['cutlass']})"]
        lines += [f"  {v['name']:<40} {v['arch']:<6} {v['dtype']:<9} {v['hash'][:12]}  "
                  f"{', '.join(v['entry_points'])}" for v in data["variants"]]
    except (OSError, ValueError) as e:
        return _err(f"cannot read {manifest}: {e}. Fix: pass a folder written by `hierasparse-gen build`")
    except (KeyError, TypeError, AttributeError) as e:
        return _err(f"{manifest} is not a build manifest of this version (missing {e}). Fix: rebuild it with "
                    f"`hierasparse-gen build SPEC`")
    print("\n".join(lines))
    return 0


def cmd_clean(args) -> int:
    from .compiler import clean
    try:
        removed = clean(args.dir)
    except FileNotFoundError as e:
        return _err(str(e))
    print(f"removed {len(removed)} entries from {args.dir}")
    return 0


def cmd_bench(args) -> int:
    from .bench import main
    return main(args.rest)


def cmd_eval(args) -> int:
    from .evaluate.cli import main
    return main(args.rest)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # its own parser: REMAINDER would not take options that come first
        return cmd_eval(argparse.Namespace(rest=argv[1:]))
    ap = argparse.ArgumentParser(prog="hierasparse-gen",
                                 description="Generate, compile and load 2:4-sparse KV-cache attention kernels.",
                                 epilog="`hierasparse-gen list` shows the specs shipped with the package; "
                                        "`hierasparse-gen build specs/llama3.yaml` builds one from any folder.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="render and compile every kernel variant of a spec")
    b.add_argument("spec", help="spec YAML, e.g. specs/llama3.yaml; the specs shipped with the package "
                   "(see `hierasparse-gen list`) are found from any folder as specs/<name>.yaml or <name>")
    b.add_argument("--out", help="output folder (default generated/<spec name>)")
    b.add_argument("--jobs", type=int, help="parallel nvcc jobs (default: from cores and memory)")
    b.set_defaults(fn=cmd_build)
    ls = sub.add_parser("list", help="list the variants of a build, or the specs shipped with the package")
    ls.add_argument("dir", nargs="?", help="build folder (or its manifest.json); without it, the shipped specs")
    ls.set_defaults(fn=cmd_list)
    c = sub.add_parser("clean", help="remove a build folder")
    c.add_argument("dir")
    c.set_defaults(fn=cmd_clean)
    be = sub.add_parser("bench", help="time decode against dense SDPA (needs a GPU)", add_help=False)
    be.add_argument("rest", nargs=argparse.REMAINDER)
    be.set_defaults(fn=cmd_bench)
    ev = sub.add_parser("eval", help="quality of the sparse cache on a causal LM, dense beside sparse",
                        add_help=False)
    ev.add_argument("rest", nargs=argparse.REMAINDER)
    ev.set_defaults(fn=cmd_eval)
    args = ap.parse_args(argv)
    if getattr(args, "jobs", None) is not None and args.jobs < 1:
        return _err(f"--jobs {args.jobs} must be at least 1. Fix: pass --jobs 1 or more, or leave it out")
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
