"""End to end at the largest batch that fits: the Llama-3.1-8B shape (random fp16 weights) with 32K-token
prompts, per KV cache format: how many sequences of prompt + new tokens the GPU's memory holds beside the weights,
and the decode tokens per second at that batch (CUDA-graph decode through ``hierasparse_gen.hf``).

    python benchmarks/e2e_capacity.py --lib generated/llama3-fp8 --length 32768 --json e2e_capacity.json

Formats, all through the sparse cache (sink 64, window 256, block 64): ``fp16-dense`` (ratio 0: every block dense
in fp16, the bytes of a plain fp16 cache), ``e4m3-dense`` (ratio 0, K and V e4m3: the FP8 cache engines ship),
``fp16-2:4`` (ratio 1) and ``e4m3-2:4`` (ratio 1, K and V e4m3). The caches are filled with random K/V, not by a
prefill of the model (what is measured is decode: a 32K prefill of 8B weights per sequence would cost minutes at
these batches), so blocks are chosen by prune loss. The largest batch: the GPU's free memory after the weights
and a reserve for the decode step's activations, over one sequence's measured cache bytes (all layers), then
confirmed by allocating it (one less on an out-of-memory error).
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

FORMATS = {  # name: (ratio, storage)
    "fp16-dense": (0.0, "model"),
    "e4m3-dense": (0.0, "float8_e4m3"),
    "fp16-2:4": (1.0, "model"),
    "e4m3-2:4": (1.0, "float8_e4m3"),
}


def llama31_8b(max_len: int):
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=max_len)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.float16)
    return model.eval()


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def filled_cache(model, lib, fmt: str, batch: int, L: int, new_tokens: int):
    """A HieraSparseCache of ``batch`` sequences holding L random tokens in every layer (one random K/V shared by
    the sequences: the bytes and the kernels' work are the same)."""
    ratio, storage = FORMATS[fmt]
    hf.enable(model, lib, key_ratio=ratio, value_ratio=ratio, sink=64, window=256, cuda_graph=True,
              selection="prune_loss", key_channels="magnitude", value_tokens="magnitude", key_storage=storage,
              value_storage=storage)
    cache = hf.make_cache(model, batch_size=batch, max_cache_len=L + new_tokens)
    g = torch.Generator("cuda").manual_seed(L)
    k1 = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16, generator=g)
    v1 = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16, generator=g)
    k, v = k1.expand(batch, -1, -1, -1), v1.expand(batch, -1, -1, -1)
    for layer in cache.layers:
        layer.lazy_initialization(k[:, :, :1], v[:, :, :1])
        layer.store.prefill(k, v)
        layer.seen = L
    del k1, v1, k, v
    return cache


@torch.no_grad()
def decode_rate(model, cache, batch: int, L: int, steps: int) -> float:
    """Decode tokens per second (all sequences) over ``steps`` graph-replayed steps after a warm-up step."""
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    pos = torch.full((batch, 1), L, dtype=torch.long, device="cuda")

    def step(ids, p):
        return model(input_ids=ids, position_ids=p, past_key_values=cache, use_cache=True,
                     logits_to_keep=1).logits[:, -1]

    tok = step(tok, pos).argmax(-1, keepdim=True)  # capture (and first replay)
    pos += 1
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = step(tok, pos).argmax(-1, keepdim=True)
        pos += 1
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def per_sequence_bytes(model, lib, fmt: str, L: int, new_tokens: int) -> int:
    _free()
    before = torch.cuda.memory_allocated()
    cache = filled_cache(model, lib, fmt, 1, L, new_tokens)
    _free()
    used = torch.cuda.memory_allocated() - before
    del cache
    _free()
    return used


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default="generated/llama3-fp8", help="a build with the mixed tiers in fp16 and e4m3")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reserve-gib", type=float, default=6.0, help="memory kept for the decode step's activations")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    lib = hierasparse_gen.load(args.lib)
    L = args.length
    model = llama31_8b(L + args.new_tokens)
    _free()
    total = torch.cuda.get_device_properties(0).total_memory
    weights = torch.cuda.memory_allocated()
    print(f"device: {torch.cuda.get_device_name()}, {total / 2**30:.1f} GiB; weights {weights / 2**30:.1f} GiB; "
          f"prompt {L}, new tokens {args.new_tokens}")
    rows = []
    for fmt in args.formats:
        seq = per_sequence_bytes(model, lib, fmt, L, args.new_tokens)
        free = torch.cuda.mem_get_info()[0] - args.reserve_gib * 2**30
        batch = max(1, int(free // seq))
        while True:
            try:
                cache = filled_cache(model, lib, fmt, batch, L, args.new_tokens)
                rate = decode_rate(model, cache, batch, L, args.steps)
                break
            except torch.OutOfMemoryError:
                cache = None
                _free()
                batch -= 1
                if batch < 1:
                    raise
        peak = torch.cuda.max_memory_allocated()
        rows.append({"format": fmt, "bytes_per_sequence": seq, "batch": batch, "tokens_per_s": rate,
                     "tpot_ms": batch / rate * 1e3, "peak_gib": peak / 2**30})
        print(f"{fmt:11s} {seq / 2**30:6.3f} GiB/seq  batch {batch:3d}  {rate:8.1f} tok/s  "
              f"TPOT {batch / rate * 1e3:6.1f} ms  peak {peak / 2**30:.1f} GiB", flush=True)
        del cache
        _free()
        torch.cuda.reset_peak_memory_stats()
    base = next((r for r in rows if r["format"] == "fp16-dense"), None)
    if base:
        for r in rows:
            print(f"{r['format']:11s} x{r['batch'] / base['batch']:.2f} sequences, "
                  f"x{r['tokens_per_s'] / base['tokens_per_s']:.2f} tokens/s of fp16-dense")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "length": L, "new_tokens": args.new_tokens,
                       "weights_gib": weights / 2**30, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
