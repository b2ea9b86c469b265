"""A shortcut that makes the evaluation affordable on a real model on the CPU, with the same results.

With attend-then-compress, a sparse prefill attends densely and then compresses, so its K/V are those of a
dense prefill: ``prefill_from`` fills the sparse caches of every setting from one dense prefill's K/V (and
the prompt's last queries, for the selections that read them) instead of re-running the model over the
prompt. It reaches into the transformers integration's cache layers (``store``, ``seen``,
``lazy_initialization``); when those are not there the evaluation prefills through the model (``--exact``
asks for that), and the tests check that both give the same numbers.
"""

from __future__ import annotations

import contextlib

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CAPTURE = "hierasparse_capture"
#: queries kept per layer: the largest observation window a setting may ask for
OBSERVE_MAX = 256
_CAPTURED: dict | None = None


def _capturing_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """SDPA that also keeps each layer's last OBSERVE_MAX queries and its scale (one call a layer)."""
    if _CAPTURED is not None:
        _CAPTURED[getattr(module, "layer_idx", len(_CAPTURED))] = (query[:, :, -OBSERVE_MAX:].detach().clone(),
                                                                   kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


AttentionInterface.register(CAPTURE, _capturing_sdpa)


@contextlib.contextmanager
def capture_queries(model):
    """Within: the model attends with SDPA and the dict it yields fills with {layer: (q, scale)}."""
    global _CAPTURED
    _CAPTURED = {}
    model.set_attn_implementation(CAPTURE)
    try:
        yield _CAPTURED
    finally:
        _CAPTURED = None
        model.set_attn_implementation("sdpa")


def dense_prefill_kv(cache, queries: dict | None = None) -> list[tuple] | None:
    """Per layer (K, V, last queries or None, scale) of a dense transformers cache, or None if unreadable."""
    try:
        kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    except AttributeError:
        return None
    queries = queries or {}
    return [(k, v, *queries.get(i, (None, None))) for i, (k, v) in enumerate(kv)]


def prefill_from(cache, kv: list[tuple]) -> bool:
    """Fill a fresh HieraSparseCache with a dense prefill's K/V, as the attend-then-compress
    prefill would; False (and nothing written) when its layers do not look as expected."""
    layers = getattr(cache, "layers", [])
    if len(layers) != len(kv) or not all(hasattr(x, "lazy_initialization") and hasattr(x, "seen") for x in layers):
        return False
    for layer, (k, v, q_last, scale) in zip(layers, kv):
        layer.lazy_initialization(k, v)
        select_q = None
        if q_last is not None:  # the prompt's queries as the cache takes them: only the last rows are read
            select_q = q_last.new_zeros(q_last.shape[0], q_last.shape[1], k.shape[2], q_last.shape[3])
            select_q[:, :, -q_last.shape[2]:] = q_last
        layer.store.prefill(k, v, [k.shape[2]], select_q=select_q, scale=scale)
        layer.seen = k.shape[2]
    return True
