"""End-to-end generation on a Llama-3.1-8B-shaped random-weight model (fp16, batch 1): time to
first token, time per output token and peak GPU memory, for dense attention (transformers'
default DynamicCache + SDPA) and the sparse KV cache, in one run.

    python benchmarks/e2e_generate.py --lib generated/llama3 --lengths 32768 65536 131072 \\
        --new-tokens 100 --json e2e.json

Rows: ``dense`` (SDPA); ``<prefill mode>/<eager|graph>``: the sparse cache with K and V
ratio 1 (every eligible block 2:4), decode eager (one Python forward a token, as
transformers' generate runs it) or from a captured CUDA graph (hierasparse_gen.hf.GraphedDecoder);
``dense-kv/graph``: the same cache and kernels with ratio 0 (all blocks dense). Greedy tokens; the weights are random, so only the
timings and memory mean anything. Peak memory counts everything allocated (weights included).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import transformers

import hierasparse_gen
from hierasparse_gen import hf


def llama31_8b(max_len: int):
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=max_len, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.float16)
    return model.eval()


def _sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def run(model, lib, row: str, L: int, new_tokens: int, sink: int, window: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(0, model.config.vocab_size, (1, L), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(L))
    if row == "dense":
        model.set_attn_implementation("sdpa")
        cache = transformers.DynamicCache(config=model.config)
    else:
        mode, graphed = row.split("/")
        graphed = graphed == "graph"
        ratio = 1.0
        if mode == "dense-kv":  # every block dense (ratio 0): the same kernels and harness, no 2:4
            mode, ratio = "attend_then_compress", 0.0
        hf.enable(model, lib, key_ratio=ratio, value_ratio=ratio, sink=sink, window=window, prefill_mode=mode,
                  cuda_graph=graphed)
        cache = hf.make_cache(model, batch_size=1, max_cache_len=L + new_tokens)
    t0 = _sync_time()
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    tok = logits.argmax(-1, keepdim=True)
    ttft = _sync_time() - t0
    pos = torch.full((1, 1), L, dtype=torch.long, device="cuda")

    def step_fn(ids, p):  # what generate() runs a token (graphed rows: one replay, see hf.enable)
        return model(input_ids=ids, position_ids=p, past_key_values=cache, use_cache=True,
                     logits_to_keep=1).logits[:, -1]

    tok = step_fn(tok, pos).argmax(-1, keepdim=True)  # first decode step: warm-up (and capture), not timed
    pos += 1
    steps = new_tokens - 2
    t1 = _sync_time()
    for _ in range(steps):
        tok = step_fn(tok, pos).argmax(-1, keepdim=True)
        pos += 1
    tpot = (_sync_time() - t1) / steps
    peak = torch.cuda.max_memory_allocated()
    del cache
    return {"row": row, "prompt": L, "new_tokens": new_tokens, "ttft_s": ttft, "tpot_ms": tpot * 1e3,
            "peak_gib": peak / 2**30}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default="generated/llama3")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--rows", nargs="+", default=["dense", "balanced/eager", "compress_then_attend/eager",
                                                   "attend_then_compress/eager", "attend_then_compress/graph"])
    ap.add_argument("--repeat", type=int, default=1, help="runs of every row (spread of the timings)")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    lib = hierasparse_gen.load(args.lib)
    model = llama31_8b(max(args.lengths) + args.new_tokens)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"weights {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    results = []
    for L in args.lengths:
        for row in [r for _ in range(args.repeat) for r in args.rows]:  # interleaved
            try:
                r = run(model, lib, row, L, args.new_tokens, args.sink, args.window)
            except torch.OutOfMemoryError as e:
                r = {"row": row, "prompt": L, "error": f"out of memory: {str(e).splitlines()[0]}"}
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
