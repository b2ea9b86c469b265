"""The attention shape one process computes when transformers runs a model tensor-parallel.

Under a tensor-parallel plan (``from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))``
under ``torchrun``) the query, key and value projections are split by output rows ("colwise"), so each
rank computes a slice of the heads: Llama-3.1-8B (32 query, 8 KV heads) on 2 GPUs gives 16 and 4 a rank,
on 8 GPUs 4 and 1. The model's config keeps the global counts, so the sparse cache and the kernel check
are sized from the projections' local weights, which is what the attention tensors will carry.

Block choices are per (sequence, KV head) and every rank holds whole KV heads, so the cache adds no
communication: each rank compresses and attends its own heads, and the plan's row-parallel output
projection sums the ranks' outputs as it does for dense attention.

Plain torch (no transformers import): a sharded weight is a DTensor, read through ``to_local()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedError

#: a tp_plan override that replicates KV heads when there are fewer than ranks (transformers' style)
REPLICATE_KV = ("{'model.layers.*.self_attn.k_proj': 'unit_colwise', "
                "'model.layers.*.self_attn.v_proj': 'unit_colwise'}")


@dataclass(frozen=True)
class RankHeads:
    """The heads one process's attention layers compute (all heads without tensor parallelism)."""
    q_heads: int
    kv_heads: int
    head_dim: int
    tp_size: int = 1

    @property
    def group(self) -> int:
        """Query heads per KV head as the kernels see it (the GQA group of the spec's shapes)."""
        return self.q_heads // self.kv_heads


def tp_size(model) -> int:
    """The tensor-parallel degree transformers sharded ``model`` with (1 when it did not)."""
    try:
        return int(getattr(model, "tp_size", None) or 1)
    except (AttributeError, TypeError):
        return 1


def _attention_module(model):
    """The first module holding separate q/k/v projections with weights (Llama, Mistral, Qwen3)."""
    for module in model.modules():
        projs = [getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        if all(getattr(p, "weight", None) is not None for p in projs):
            return module
    return None


def _rows(linear) -> int:
    w = linear.weight
    return (w.to_local() if hasattr(w, "to_local") else w).shape[0]


def rank_heads(model, heads: int, kv_heads: int, head_dim: int) -> RankHeads:
    """The heads this process computes, given the model's global ``heads``/``kv_heads``/``head_dim``.

    Refuses (UnsupportedError) a plan that splits a head between ranks, and one whose query heads
    would meet other KV heads than in the unsharded model."""
    tp = tp_size(model)
    if tp == 1:
        return RankHeads(heads, kv_heads, head_dim)
    attn = _attention_module(model)
    if attn is None:
        raise UnsupportedError(f"the model runs tensor-parallel over {tp} ranks, but no attention layer with "
                               f"q_proj/k_proj/v_proj was found to read this rank's heads from. Fix: use a model "
                               f"with separate query, key and value projections (Llama, Mistral, Qwen3), or load "
                               f"it without a tensor-parallel plan")
    q_rows, k_rows, v_rows = (_rows(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj"))
    divisors = [d for d in range(1, kv_heads + 1) if kv_heads % d == 0]
    if q_rows % head_dim or k_rows % head_dim or k_rows != v_rows:
        raise UnsupportedError(
            f"tensor parallelism over {tp} ranks leaves this rank {q_rows} query and {k_rows} key features: "
            f"part of a head of {head_dim} ({heads} query and {kv_heads} KV heads do not split evenly). Fix: run "
            f"with a tp_size that divides both head counts (KV heads {kv_heads}: {divisors}), or replicate the "
            f"KV heads with DistributedConfig(tp_plan={REPLICATE_KV})")
    q, kv = q_rows // head_dim, k_rows // head_dim
    group = heads // kv_heads
    # Contiguous slices: a rank's query heads meet its KV heads as in the whole model when the group is
    # unchanged, or when its one (replicated) KV head is the one all its query heads share.
    if q % kv or not (q // kv == group or (kv == 1 and group % q == 0)):
        raise UnsupportedError(
            f"under tensor parallelism over {tp} ranks this rank computes {q} query and {kv} KV heads, which do "
            f"not pair as the model's {heads} query and {kv_heads} KV heads (group {group}). Fix: run with a "
            f"tp_size that divides num_key_value_heads ({divisors}), or one whose query heads per rank divide "
            f"the group with the KV heads replicated (DistributedConfig(tp_plan={REPLICATE_KV}))")
    return RankHeads(q, kv, head_dim, tp)
