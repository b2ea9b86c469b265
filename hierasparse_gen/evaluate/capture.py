"""Real activations for the kernel tests: post-RoPE Q, K and V of a few attention layers of a
model on a long prompt, saved as one small file (float16) that can travel to a GPU machine.

    hierasparse-gen eval --model smollm2 --prefill 4096 --capture activations.pt --capture-layers 0,15,29

The GPU tests (tests/test_gpu_real.py, ``HIERASPARSE_ACTIVATIONS=activations.pt``) run the
kernels on them against the simulation and the float64 reference: real statistics, outlier
channels included, where the other tests use random inputs.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..errors import InputError

RECORD = "hierasparse_record"
_RECORDED: dict | None = None
_LAYERS: set[int] = set()


def _recording_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    i = getattr(module, "layer_idx", -1)
    if _RECORDED is not None and i in _LAYERS:
        _RECORDED[i] = tuple(x.detach().to("cpu", torch.float16) for x in (query, key, value)) + \
            (kwargs.get("scaling"),)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


AttentionInterface.register(RECORD, _recording_sdpa)


@contextlib.contextmanager
def _recording(model, layers):
    global _RECORDED, _LAYERS
    _RECORDED, _LAYERS = {}, set(layers)
    model.set_attn_implementation(RECORD)
    try:
        yield _RECORDED
    finally:
        _RECORDED, _LAYERS = None, set()
        model.set_attn_implementation("sdpa")


@torch.no_grad()
def capture(model, ids: list[int], layers: list[int], *, meta: dict | None = None) -> dict:
    """Q ``[n, Hq, P, D]``, K and V ``[n, Hkv, P, D]`` (float16, n = len(layers)) of one forward
    over ``ids``, with the layers' softmax scale."""
    count = model.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < count]
    if bad or not layers:
        raise InputError(f"--capture-layers {layers}: the model has layers 0..{count - 1}. Fix: e.g. "
                         f"--capture-layers 0,{count // 2},{count - 1}")
    device = next(model.parameters()).device
    x = torch.tensor(ids, device=device).unsqueeze(0)
    with _recording(model, layers) as got:
        model(input_ids=x, use_cache=False, logits_to_keep=1)
    missing = [i for i in layers if i not in got]
    if missing:
        raise InputError(f"layers {missing} did not go through the attention interface, so nothing was recorded. "
                         f"Fix: capture from a model whose attention calls transformers' attention functions")
    out = {name: torch.cat([got[i][j] for i in layers]) for j, name in enumerate("qkv")}
    out.update(layers=list(layers), scale=[got[i][3] for i in layers], tokens=len(ids), **(meta or {}))
    return out
