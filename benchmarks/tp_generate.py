"""Tensor-parallel generation of a Llama-3.1-8B-shaped random-weight model (fp16) under torchrun: time to
first token, time per output token and per-GPU peak memory for dense attention (SDPA, transformers'
DynamicCache) and the sparse KV cache at the same tensor-parallel degree, and whether the greedy tokens
equal a single-GPU run's.

    # once, one GPU: writes the random weights (16 GB) and the single-GPU reference
    python benchmarks/tp_generate.py --weights /data/llama31-8b-random --lib generated/llama3 --json tp1.json
    # then at each degree, on as many GPUs
    torchrun --nproc-per-node 2 benchmarks/tp_generate.py --weights /data/llama31-8b-random \\
        --lib generated/llama3 --reference tp1.json --json tp2.json

The model is loaded with transformers' tensor-parallel plan (``DistributedConfig(tp_plan="auto")``: query,
key and value projections split by heads, output and down projections reduced over NCCL); each rank's
sparse cache holds its KV heads (8B: 4 of 8 at TP=2, 1 at TP=8), all with GQA group 4, the group
``specs/llama3.yaml`` builds. Rows: ``dense``; ``sparse/eager`` (one Python forward a decode step, as
``generate()`` runs it); ``sparse/graph`` (decode steps replay one captured CUDA graph, NCCL all-reduces
included). Timings are the slowest rank's; memory is each rank's peak (weights included) and the bytes its
KV cache holds. The weights are
random, so only the timings, the memory and the token equality mean anything. ``--tiny --device cpu
--backend simulate`` runs the same flow on a small model on the CPU (gloo), to check the script.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torch.distributed as dist
import transformers

import hierasparse_gen
from hierasparse_gen import hf


def llama31_8b_config(max_len: int, tiny: bool = False):
    if tiny:  # the same head layout (32 query, 8 KV heads), small everywhere else
        sizes = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, head_dim=64)
    else:
        sizes = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128)
    return transformers.LlamaConfig(num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                                    rope_theta=500000.0, max_position_embeddings=max_len,
                                    attn_implementation="sdpa", **sizes)


def make_weights(folder: str, max_len: int, tiny: bool, device: str) -> None:
    """Random weights (seed 0), written once so every degree loads the same model."""
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(llama31_8b_config(max_len, tiny), dtype=torch.float16)
    model.save_pretrained(folder)
    del model


def _sync(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter()


@torch.no_grad()
def run_row(model, lib, row: str, args, device) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    L, B = args.length, args.batch
    # the same prompt on every rank and in the reference run (generated on the CPU)
    prompt = torch.randint(0, model.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(L)).to(device)
    if row == "dense":
        model.set_attn_implementation("sdpa")
        cache = transformers.DynamicCache(config=model.config)
    else:
        hf.enable(model, lib, key_ratio=args.key_ratio, value_ratio=args.value_ratio, sink=args.sink,
                  window=args.window, prefill_mode=args.prefill_mode, backend=args.backend,
                  cuda_graph=row == "sparse/graph")
        cache = hf.make_cache(model, batch_size=B, max_cache_len=L + args.new_tokens)
    key = hf.cache_argument(model)
    t0 = _sync(device)
    logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{key: cache}).logits[:, -1]
    tok = logits.argmax(-1, keepdim=True)
    ttft = _sync(device) - t0
    tokens = [tok]
    pos = torch.full((B, 1), L, dtype=torch.long, device=device)

    def step(ids, p):  # what generate() runs a token (sparse/graph: one replay, see hf.enable)
        return model(input_ids=ids, position_ids=p, use_cache=True, logits_to_keep=1, **{key: cache}).logits[:, -1]

    tok = step(tok, pos).argmax(-1, keepdim=True)  # first decode step: warm-up (and capture), not timed
    tokens.append(tok)
    pos += 1
    steps = args.new_tokens - 2
    t1 = _sync(device)
    for _ in range(steps):
        tok = step(tok, pos).argmax(-1, keepdim=True)
        tokens.append(tok)
        pos += 1
    tpot = (_sync(device) - t1) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result = {"row": row, "prompt": L, "batch": B, "new_tokens": args.new_tokens, "ttft_s": ttft,
              "tpot_ms": tpot * 1e3, "peak_gib": peak, "tokens": torch.cat(tokens, 1).tolist()}
    if row == "dense":
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    else:
        held = sum(layer.store.nbytes()["total"] for layer in cache.layers)
        result["kv_heads_per_rank"] = cache.layers[0].store.heads
    result["cache_gib"] = held / 2**30  # the bytes the KV cache holds on this rank (live blocks)
    del cache
    return result


def gather(result: dict) -> dict:
    """One row for the whole run: the slowest rank's times, every rank's peak memory and KV heads."""
    if not dist.is_initialized():
        return dict(result, peak_gib=[result["peak_gib"]], cache_gib=[result["cache_gib"]])
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, result)
    merged = dict(result, ttft_s=max(r["ttft_s"] for r in every), tpot_ms=max(r["tpot_ms"] for r in every),
                  peak_gib=[r["peak_gib"] for r in every], cache_gib=[r["cache_gib"] for r in every])
    if any(r["tokens"] != result["tokens"] for r in every):
        merged["ranks_disagree"] = True  # a check: every rank argmaxes the same gathered logits
    return merged


def compare(row: dict, reference: list[dict]) -> None:
    """Adds how many greedy tokens equal the single-GPU run's (per sequence, up to the first difference)."""
    ref = next((r for r in reference if r["row"] == row["row"] and r["prompt"] == row["prompt"]
                and r["batch"] == row["batch"]), None)
    if ref is None:
        return
    same = []
    for a, b in zip(row["tokens"], ref["tokens"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same.append(n)
    row["tokens_equal_reference"] = same  # == new_tokens everywhere: identical


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="model folder; written (random weights) by a 1-GPU run if absent")
    ap.add_argument("--lib", default="generated/llama3", help="built library (kernels backend)")
    ap.add_argument("--length", type=int, default=32768, help="prompt tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rows", nargs="+", default=["dense", "sparse/eager", "sparse/graph"])
    ap.add_argument("--key-ratio", type=float, default=1.0)
    ap.add_argument("--value-ratio", type=float, default=1.0)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--prefill-mode", default="attend_then_compress")
    ap.add_argument("--backend", choices=("kernels", "simulate"), default="kernels")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model of the same head layout (script checks)")
    ap.add_argument("--reference", help="JSON of a single-GPU run: compare the greedy tokens")
    ap.add_argument("--json", help="write the rows here (rank 0)")
    args = ap.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    max_len = 262144  # the config's limit only (plain RoPE): one set of weights serves every length
    if not os.path.exists(os.path.join(args.weights, "config.json")):
        if world > 1:
            raise SystemExit(f"{args.weights} holds no model. Fix: run the single-GPU reference first (plain python, "
                             f"no torchrun): it writes the random weights there")
        make_weights(args.weights, max_len, args.tiny, args.device)
    if world > 1:
        from transformers.distributed import DistributedConfig
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.weights, dtype=torch.float16 if args.device == "cuda" else torch.float32,
            distributed_config=DistributedConfig(tp_plan="auto"))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.weights, dtype=torch.float16 if args.device == "cuda" else torch.float32).to(args.device)
    model.eval()
    device = next(model.parameters()).device
    lib = hierasparse_gen.load(args.lib) if args.backend == "kernels" else None
    reference = json.load(open(args.reference))["rows"] if args.reference else []
    header = {"tp": world, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "settings": {k: getattr(args, k) for k in ("key_ratio", "value_ratio", "sink", "window",
                                                         "prefill_mode", "backend")}}
    if rank == 0:
        print(json.dumps(header), flush=True)
    rows = []
    for name in args.rows:  # dense first: enable() switches the model's attention for the later rows
        try:
            row = gather(run_row(model, lib, name, args, device))
        except torch.OutOfMemoryError as e:
            if world > 1:  # the other ranks wait in a collective: stop them all
                raise
            row = {"row": name, "prompt": args.length, "error": f"out of memory: {str(e).splitlines()[0]}"}
        compare(row, reference)
        rows.append(row)
        if rank == 0:
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header, rows=rows), f, indent=1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
