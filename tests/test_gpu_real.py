"""The kernels on a real model's activations: post-RoPE Q/K/V of SmolLM2 layers on a long
English prompt (``hierasparse-gen eval --capture``; outlier channels and peaked attention
included), where the other GPU tests use random inputs. Each cache prefill mode, a later chunk
and decode steps across a flush, fp16 and bf16, against the simulation (same tiers, the same
stored K/V bit for bit) and the float64 reference on that stored K/V, with the tolerances of the
random-input tests; outputs poisoned.

Runs when ``HIERASPARSE_ACTIVATIONS`` names a capture file, e.g.

    hierasparse-gen eval --model smollm2 --prefill 4096 --capture acts.pt --capture-layers 0,15,29
    HIERASPARSE_ACTIVATIONS=acts.pt python -m pytest -q -m gpu tests/test_gpu_real.py
"""

import os

import pytest
import torch

from hierasparse_gen.cache import HieraCache
from hierasparse_gen.simulate import SimulatedCache
from helpers import cache_chunk, check_against_reference, kernel_masses

pytestmark = pytest.mark.gpu

MODES = ["compress_then_attend", "attend_then_compress", "balanced"]
CHUNK, STEPS = 256, 80  # a later prefill chunk, then decode steps (crossing a block boundary: a flush)


@pytest.fixture(scope="module")
def acts():
    path = os.environ.get("HIERASPARSE_ACTIVATIONS")
    if not path:
        pytest.skip("HIERASPARSE_ACTIVATIONS is not set (a file from hierasparse-gen eval --capture)")
    got = torch.load(path)
    assert got["q"].shape[2] == got["k"].shape[2] > 1024 + CHUNK + STEPS
    return got


def _same_cache(cache, sim):
    for name in "kv":
        assert torch.equal(cache.tiers(name), sim.tiers(name)), f"{name}: the kernels chose other blocks"
    (hk, hv), (sk, sv) = cache.to_dense(), sim.to_dense()
    assert torch.equal(hk, sk) and torch.equal(hv, sv), "stored K/V differ from the simulation's"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_real_activations(smollm2, poison, monkeypatch, acts, layer, mode, dtype):
    if layer >= len(acts["layers"]):
        pytest.skip(f"the capture holds {len(acts['layers'])} layers")
    q, k, v = (acts[n][layer:layer + 1].to("cuda", dtype) for n in "qkv")
    scale = acts["scale"][layer]
    kernel_masses(monkeypatch, smollm2)
    total = q.shape[2]
    prompt = total - CHUNK - STEPS
    kw = dict(batch=1, num_kv_heads=k.shape[1], head_dim=k.shape[3], max_seq_len=total, key_ratio=0.5,
              value_ratio=0.75, dtype=dtype, device="cuda")
    cache, sim = HieraCache(smollm2, **kw), SimulatedCache(**kw)  # selection "auto": attention, q is given
    if scale is not None:
        assert abs(scale - k.shape[3] ** -0.5) < 1e-6  # the kernels' default scale is the model's
    for start, n in ((0, prompt), (prompt, CHUNK)):
        rows = slice(start, start + n)
        cache_chunk(cache, mode, q[:, :, rows], k[:, :, rows], v[:, :, rows], [n])
        sim.prefill(k[:, :, rows], v[:, :, rows], [n], q=q[:, :, rows], mode=mode)
        _same_cache(cache, sim)
    assert cache.tiers("k").sum() > 0 and cache.tiers("v").sum() > 0
    for pos in range(prompt + CHUNK, total):
        cache.append(k[:, :, pos], v[:, :, pos])
        sim.append(k[:, :, pos], v[:, :, pos])
        out, lse = cache.attend(q[:, :, pos])
        sk, sv = sim.to_dense()
        check_against_reference(out, lse, q[:, :, pos], sk, sv, torch.tensor(sim.lengths))
    _same_cache(cache, sim)
    assert cache.n_eligible == sim.n_eligible and cache.lengths == sim.lengths == [total]
