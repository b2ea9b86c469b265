"""Greedy generation of small saved models with the simulated sparse cache, one process or one rank
of a tensor-parallel run: ``tests/test_tensor_parallel.py`` runs it in-process and under
``python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py FOLDER`` (gloo, CPU), where
each rank writes ``FOLDER/rank<r>.pt``. With a build as second argument the ranks run the GPU cases
(NCCL, fp16, the kernels backend with CUDA-graph decode)."""

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
#: With a replicated KV head each rank scores blocks and weighs K's channels and V's tokens by its own query heads
#: (4 of the 8), so the query-aware choices ("auto") differ from one process's by design; these read only K/V.
POLICY = {"replicated": dict(selection="prune_loss", key_channels="magnitude", value_tokens="magnitude")}


#: the same on GPUs with the kernels (NCCL; a head_dim-128, group-4 model: specs/llama3.yaml's kernels, whose
#: block table has 64-token blocks: a 600-token prompt leaves 6 eligible blocks, 3 of them 2:4)
GPU_SETTINGS = dict(key_ratio=0.5, value_ratio=0.5, sink=64, window=128, block_size=64)
GPU_PROMPT = 600
GPU_CASES = {
    "whole": ("kv2_d128", "auto", "attend_then_compress", None),
    "chunked": ("kv2_d128", "auto", "compress_then_attend", 128),
}


def prompt_and_mask(folder: str):
    ids = torch.load(os.path.join(folder, "prompt.pt"))
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    return ids, mask


def load(path: str, plan=None, gpu: bool = False):
    """The saved model in one process (on GPU 0 with ``gpu``), or this rank's shard under ``plan``."""
    import transformers
    kwargs = {}
    if plan is not None:  # the plan places each rank on its GPU (cuda:LOCAL_RANK) or on the CPU
        from transformers.distributed import DistributedConfig
        kwargs["distributed_config"] = DistributedConfig(tp_plan=plan)
    dtype = torch.float16 if gpu else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    return model.cuda() if gpu and plan is None else model


@torch.no_grad()
def generate(model, ids, mask, mode: str, chunk: int | None, sparse: bool = True, lib=None,
             policy: dict | None = None) -> dict:
    """Greedy tokens, the logits of every step and what each layer's cache holds (``lib``: the kernels
    backend with CUDA-graph decode, else the simulation)."""
    from hierasparse_gen import hf
    from hierasparse_gen.tensor_parallel import rank_heads
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    if sparse and lib is not None:
        hf.enable(model, lib, backend="kernels", prefill_mode=mode, cuda_graph=True, **GPU_SETTINGS)
    elif sparse:
        hf.enable(model, None, backend="simulate", prefill_mode=mode, **(policy or {}), **SETTINGS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, prefill_chunk_size=chunk, return_dict_in_generate=True,
                         output_logits=True)
    result = {"tokens": out.sequences[:, ids.shape[1]:].cpu(), "logits": torch.stack(out.logits, 1).float().cpu()}
    if sparse:
        cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.2x
        stores = [layer.store for layer in cache.layers]
        config = model.config
        rank = rank_heads(model, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        result.update(heads=[s.heads for s in stores], lengths=[list(s.lengths) for s in stores],
                      tiers={n: [s.tiers(n).cpu() for s in stores] for n in "kv"},
                      rank=(rank.q_heads, rank.kv_heads, rank.tp_size))
        if lib is None:
            result["keys"] = [s.view("k") for s in stores]
    return result


def main(folder: str, lib_path: str | None = None) -> None:
    """Every case on this rank; ``lib_path``: the GPU cases with that build's kernels."""
    rank = int(os.environ["RANK"])
    ids, mask = prompt_and_mask(folder)
    lib = None
    results = {}
    for name, (model_dir, plan, mode, chunk) in (GPU_CASES if lib_path else CASES).items():
        model = load(os.path.join(folder, model_dir), plan, gpu=lib_path is not None)
        if lib_path and lib is None:  # after the plan bound this rank to its GPU
            import hierasparse_gen
            lib = hierasparse_gen.load(lib_path)
        results[name] = generate(model, ids, mask, mode, chunk, lib=lib, policy=POLICY.get(name))
        del model
    if lib_path is None:  # Llama's own plan cuts the one KV head in halves: enable must refuse it
        from hierasparse_gen import hf
        from hierasparse_gen.errors import UnsupportedError
        try:
            hf.enable(load(os.path.join(folder, "kv1"), "auto"), None, backend="simulate", **SETTINGS)
            results["refused"] = None
        except UnsupportedError as e:
            results["refused"] = str(e)
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
