"""Generate text with a sparse KV cache from a local Hugging Face model directory
(Llama, Mistral, Qwen3, ...), with the method's knobs.

    python examples/generate.py --model /models/Llama-3.1-8B-Instruct --lib generated/llama3 \\
        --prompt-file long.txt --key-ratio 1 --value-ratio 1 --sink 64 --window 256 \\
        --prefill-mode attend_then_compress --new-tokens 100

`--dense` runs the same generation with dense attention (SDPA) for comparison. Without a
tokenizer in the directory, `--random-prompt N` feeds N random token ids (timing runs).
`--backend simulate` runs the pure-torch model of the cache (no library; slow, small models).
Nothing is downloaded: the model directory must hold the config and weights.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory only

import transformers  # noqa: E402

import hierasparse_gen  # noqa: E402
from hierasparse_gen.cache import PREFILL_MODES  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local model directory (config + weights)")
    ap.add_argument("--lib", default="generated/llama3", help="a built library, or a spec YAML to build")
    ap.add_argument("--prompt", default="The history of the transistor begins")
    ap.add_argument("--prompt-file", help="read the prompt from this file")
    ap.add_argument("--random-prompt", type=int, default=0, help="N random token ids instead of text")
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--block-size", type=int, default=None, help="cache block (default: the spec's)")
    ap.add_argument("--key-ratio", type=float, default=1.0, help="fraction of eligible K blocks stored 2:4")
    ap.add_argument("--value-ratio", type=float, default=1.0, help="fraction of eligible V blocks stored 2:4")
    ap.add_argument("--sink", type=int, default=None, help="dense tokens at the start (default: the spec's)")
    ap.add_argument("--window", type=int, default=None, help="dense recent tokens (default: the spec's)")
    ap.add_argument("--prefill-mode", choices=PREFILL_MODES, default="attend_then_compress")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="prefill the prompt in chunks of N tokens")
    ap.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly (one Python forward a token)")
    ap.add_argument("--dense", action="store_true", help="dense attention (SDPA), for comparison")
    ap.add_argument("--backend", choices=("kernels", "simulate"), default="kernels")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    dtype = getattr(torch, args.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    tokenizer = None
    if args.random_prompt:
        ids = torch.randint(0, model.config.vocab_size, (1, args.random_prompt),
                            generator=torch.Generator().manual_seed(0))
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        text = open(args.prompt_file).read() if args.prompt_file else args.prompt
        ids = tokenizer(text, return_tensors="pt").input_ids
    ids = ids.to(args.device)
    if not args.dense:
        lib = hierasparse_gen.load(args.lib) if args.backend == "kernels" else None
        hierasparse_gen.enable(model, lib, key_ratio=args.key_ratio, value_ratio=args.value_ratio, sink=args.sink,
                               window=args.window, block_size=args.block_size, prefill_mode=args.prefill_mode,
                               backend=args.backend, cuda_graph=not args.no_cuda_graph)
    on_gpu = ids.device.type == "cuda"

    def timed_generate(n: int):
        if on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, prefill_chunk_size=args.prefill_chunk)
        if on_gpu:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    _, ttft = timed_generate(1)  # prefill + the first token
    out, total = timed_generate(args.new_tokens)
    result = {"prompt_tokens": ids.shape[1], "new_tokens": out.shape[1] - ids.shape[1], "ttft_s": ttft,
              "tpot_ms": (total - ttft) / max(1, args.new_tokens - 1) * 1e3,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None}
    if tokenizer is not None:
        print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
