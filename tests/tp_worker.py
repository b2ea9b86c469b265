"""Greedy generation of small saved models with the simulated sparse cache, one process or one rank
of a tensor-parallel run: ``tests/test_tensor_parallel.py`` runs it in-process and under
``python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py FOLDER`` (gloo, CPU), where
each rank writes ``FOLDER/rank<r>.pt``."""

from __future__ import annotations

import os
import sys

import torch

# Settings where the sparse path acts: a 300-token prompt in 32-token blocks leaves 6 eligible blocks
# (sink 1, window 2) per KV head, half of them 2:4, for K and V.
SETTINGS = dict(key_ratio=0.5, value_ratio=0.5, sink=32, window=64, block_size=32)
NEW_TOKENS = 24
PAD = 40  # left padding of the second sequence

#: case -> (model folder, tp_plan under torchrun, prefill mode, prefill chunk size)
CASES = {
    "whole": ("kv4", "auto", "attend_then_compress", None),
    "chunked": ("kv4", "auto", "compress_then_attend", 128),
    # 1 KV head on 2 ranks: transformers replicates it with the unit_colwise style
    "replicated": ("kv1", {"model.layers.*.self_attn.k_proj": "unit_colwise",
                           "model.layers.*.self_attn.v_proj": "unit_colwise"}, "balanced", None),
}


def prompt_and_mask(folder: str):
    ids = torch.load(os.path.join(folder, "prompt.pt"))
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    return ids, mask


def load(path: str, plan=None):
    import transformers
    kwargs = {}
    if plan is not None:
        from transformers.distributed import DistributedConfig
        kwargs["distributed_config"] = DistributedConfig(tp_plan=plan)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


@torch.no_grad()
def generate(model, ids, mask, mode: str, chunk: int | None, sparse: bool = True) -> dict:
    """Greedy tokens, the logits of every step and what each layer's cache holds."""
    from hierasparse_gen import hf
    from hierasparse_gen.tensor_parallel import rank_heads
    if sparse:
        hf.enable(model, None, backend="simulate", prefill_mode=mode, **SETTINGS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, prefill_chunk_size=chunk, return_dict_in_generate=True,
                         output_logits=True)
    result = {"tokens": out.sequences[:, ids.shape[1]:], "logits": torch.stack(out.logits, 1).float()}
    if sparse:
        cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.2x
        stores = [layer.store for layer in cache.layers]
        config = model.config
        rank = rank_heads(model, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        result.update(heads=[s.heads for s in stores], lengths=[s.lengths for s in stores],
                      tiers={n: [s.tiers(n) for s in stores] for n in "kv"},
                      keys=[s.view("k") for s in stores], rank=(rank.q_heads, rank.kv_heads, rank.tp_size))
    return result


def main(folder: str) -> None:
    rank = int(os.environ["RANK"])
    ids, mask = prompt_and_mask(folder)
    results = {}
    for name, (model_dir, plan, mode, chunk) in CASES.items():
        model = load(os.path.join(folder, model_dir), plan)
        results[name] = generate(model, ids, mask, mode, chunk)
        del model
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
