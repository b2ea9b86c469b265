"""Teacher-forced decode after a long prefill, dense against sparse, and the bytes a sparse
cache holds per token.

Protocol: the first P tokens of the text are the prompt; the next T are fed one at a time
through the cache (teacher forcing). Step i's logits predict token P + i + 1, so the metrics
cover the decode tokens only. The dense reference is one prefill of the prompt, then the T
decode tokens as one causal chunk after it (the same logits a step-by-step dense run gives,
much faster); ``dense_reference`` also runs the first few steps one at a time and reports how
far they are from the chunk (``check_max_abs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import hf
from ..simulate import SimulatedCache
from .fastsim import capture_queries, dense_prefill_kv, prefill_from


@dataclass(frozen=True)
class Setting:
    """One sparse configuration. ``policy`` names how 2:4 blocks are chosen (see POLICIES)."""
    key_ratio: float
    value_ratio: float
    sink: int
    window: int
    prefill_mode: str = "attend_then_compress"
    policy: str = "prune_loss"
    key_storage: str = "model"      # "model" | "float8_e4m3" (policy.STORAGES)
    value_storage: str = "model"

    def storage_label(self) -> str:
        """"model/e4m3"-style: K's storage, then V's."""
        return "/".join("e4m3" if s == "float8_e4m3" else s for s in (self.key_storage, self.value_storage))

    def label(self) -> str:
        plain = (self.key_storage, self.value_storage) == ("model", "model")
        return f"k{self.key_ratio:g}/v{self.value_ratio:g}" + ("" if plain else f" {self.storage_label()}")


# Block-selection policies: name -> keyword arguments for ``hierasparse_gen.enable``
# (hierasparse_gen.selection says what each does); ``--policies`` picks them by name.
POLICIES = {
    "prune_loss": {"selection": "prune_loss", "key_channels": "magnitude"},
    "attention": {"selection": "attention", "key_channels": "magnitude"},
    "attention@256": {"selection": "attention", "key_channels": "magnitude", "observe": 256},
    "expected_error": {"selection": "expected_error", "key_channels": "magnitude"},
    "output_error": {"selection": "output_error", "key_channels": "magnitude"},
    "prune_loss+query_k": {"selection": "prune_loss", "key_channels": "query"},
    "attention+query_k": {"selection": "attention", "key_channels": "query"},
    "expected_error+query_k": {"selection": "expected_error", "key_channels": "query"},
    "output_error+query_k": {"selection": "output_error", "key_channels": "query"},
    "output_error@256": {"selection": "output_error", "key_channels": "query", "observe": 256},
    "attention+weighted_v": {"selection": "attention", "key_channels": "magnitude", "value_tokens": "attention"},
    "attention@256+weighted_v": {"selection": "attention", "key_channels": "magnitude", "value_tokens": "attention",
                                 "observe": 256},
    # = enable's default (selection, key_channels and value_tokens "auto", with the prompt's queries)
    "attention+query_k+weighted_v": {"selection": "attention", "key_channels": "query", "value_tokens": "attention"},
    # the default observing the prompt's last 32 queries instead of 64 (half the fill's scoring work)
    "attention+query_k+weighted_v@32": {"selection": "attention", "key_channels": "query", "value_tokens": "attention",
                                        "observe": 32},
}
# a policy that names no V choice keeps V's largest magnitudes
POLICIES = {name: {"value_tokens": "magnitude", **kw} for name, kw in POLICIES.items()}


def _forward(model, ids: torch.Tensor, start: int, cache, keep: int | None = None):
    """Logits ``[n, vocab]`` (float32) of ``ids`` (1-D) placed at positions start.. in ``cache``."""
    n = ids.shape[0]
    pos = torch.arange(start, start + n, device=ids.device).unsqueeze(0)
    kwargs = {hf.cache_argument(model): cache} if cache is not None else {}
    out = model(input_ids=ids.unsqueeze(0), position_ids=pos, use_cache=cache is not None,
                logits_to_keep=keep or 0, **kwargs)
    return out.logits[0].float()


def dense_cache(model):
    from transformers import DynamicCache
    return DynamicCache(config=model.config)


@torch.no_grad()
def dense_reference(model, ids: torch.Tensor, prefill: int, decode: int, check_steps: int = 4,
                    keep_kv: bool = False) -> dict:
    """Dense logits of the decode steps ``[T, vocab]``, the step-by-step check, and (keep_kv)
    the prompt's K/V per layer for ``fastsim.prefill_from``."""
    model.set_attn_implementation("sdpa")
    cache = dense_cache(model)
    with capture_queries(model) as queries:
        _forward(model, ids[:prefill], 0, cache, keep=1)
    kv = dense_prefill_kv(cache, queries) if keep_kv else None
    chunk = _forward(model, ids[prefill:prefill + decode], prefill, cache)
    worst = 0.0
    steps = min(check_steps, decode)
    if steps:
        cache.crop(-decode)  # back to the prompt (a negative count removes tokens)
        for i in range(steps):
            step = _forward(model, ids[prefill + i:prefill + i + 1], prefill + i, cache)
            worst = max(worst, float((step[-1] - chunk[i]).abs().max()))
    return {"logits": chunk, "check_steps": steps, "check_max_abs": worst, "kv": kv}


def enable_setting(model, setting: Setting, *, backend: str, lib, block_size: int | None):
    extra = POLICIES[setting.policy]
    return hf.enable(model, lib, key_ratio=setting.key_ratio, value_ratio=setting.value_ratio, sink=setting.sink,
                     window=setting.window, block_size=block_size, prefill_mode=setting.prefill_mode,
                     backend=backend, cuda_graph=False, key_storage=setting.key_storage,
                     value_storage=setting.value_storage, **extra)


@torch.no_grad()
def sparse_decode(model, ids: torch.Tensor, prefill: int, decode: int, tick=None, prefill_kv=None):
    """Logits ``[T, vocab]`` of the decode steps through the model's sparse cache, the cache, and
    whether ``prefill_kv`` (a dense prefill's K/V; attend-then-compress only) filled it."""
    cache = hf.make_cache(model, batch_size=1, max_cache_len=prefill + decode)
    reused = prefill_kv is not None and prefill_from(cache, prefill_kv)
    if not reused:
        _forward(model, ids[:prefill], 0, cache, keep=1)
    out = []
    for i in range(decode):
        out.append(_forward(model, ids[prefill + i:prefill + i + 1], prefill + i, cache)[-1])
        if tick:
            tick()
    return torch.stack(out), cache, reused


def compare(dense_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """NLL and perplexity of ``targets`` under ``logits``, mean KL(dense || sparse), top-1 agreement."""
    lp = torch.log_softmax(logits.double(), -1)
    lq = torch.log_softmax(dense_logits.double(), -1)
    nll = float(-lp.gather(1, targets.view(-1, 1)).mean())
    kl = float((lq.exp() * (lq - lp)).sum(-1).mean().clamp(min=0))
    top1 = float((logits.argmax(-1) == dense_logits.argmax(-1)).double().mean())
    return {"nll": nll, "ppl": math.exp(nll), "kl": kl, "top1": top1}


def nll_of(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(-torch.log_softmax(logits.double(), -1).gather(1, targets.view(-1, 1)).mean())


def layer_nbytes(store) -> dict:
    """Bytes one layer's cache holds as the kernels store it (16-bit K/V, as a float32 study on the
    simulation would be served; e4m3 blocks at 1 byte a value plus their scales), and the dense
    16-bit bytes of the same tokens."""
    got = store.nbytes(itemsize=2) if isinstance(store, SimulatedCache) else store.nbytes()
    return {"total": got["total"], "dense_equivalent": got["dense_equivalent"]}


def cache_bytes_per_token(cache) -> dict:
    """Bytes per cached token over all layers, sparse and dense, and their ratio."""
    total = dense = tokens = 0
    for layer in cache.layers:
        got = layer_nbytes(layer.store)
        total += got["total"]
        dense += got["dense_equivalent"]
        tokens = max(tokens, sum(layer.store.lengths))
    return {"bytes_per_token": total / tokens, "dense_bytes_per_token": dense / tokens,
            "bytes_fraction": total / dense}
