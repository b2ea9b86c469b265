"""A shortcut that makes the evaluation affordable on a real model on the CPU, with the same results.

With attend-then-compress, a sparse prefill attends densely and then compresses, so its K/V are those of a
dense prefill: ``prefill_from`` fills the sparse caches of every setting from one dense prefill's K/V instead
of re-running the model over the prompt. It reaches into the transformers integration's cache layers
(``store``, ``seen``, ``lazy_initialization``); when those are not there the evaluation prefills through the
model (``--exact`` asks for that), and the tests check that both give the same numbers.
"""

from __future__ import annotations

import torch


def dense_prefill_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (K, V) ``[1, Hkv, P, D]`` of a dense transformers cache, or None if unreadable."""
    try:
        return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    except AttributeError:
        return None


def prefill_from(cache, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Fill a fresh HieraSparseCache with a dense prefill's K/V, as the attend-then-compress
    prefill would; False (and nothing written) when its layers do not look as expected."""
    layers = getattr(cache, "layers", [])
    if len(layers) != len(kv) or not all(hasattr(x, "lazy_initialization") and hasattr(x, "seen") for x in layers):
        return False
    for layer, (k, v) in zip(layers, kv):
        layer.lazy_initialization(k, v)
        layer.store.prefill(k, v, [k.shape[2]])
        layer.seen = k.shape[2]
    return True
