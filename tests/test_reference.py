"""Tests for hierasparse_gen.reference: float64 decode and causal prefill attention."""

from __future__ import annotations

import math
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hierasparse_gen.reference import decode_reference  # noqa: E402

ATOL = 1e-12
RTOL = 1e-10


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _qkv(B, Hq, Hkv, L, D, seed, dtype=torch.float64):
    g = _gen(seed)
    q = torch.randn(B, Hq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _sdpa(q, k, v, seqlens=None, scale=None, gqa_mode="enable_gqa"):
    """Float64 SDPA of one query per sequence; masked by seqlens (all must be > 0)."""
    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qd, kd, vd = q.double().unsqueeze(2), k.double(), v.double()
    mask = None
    if seqlens is not None:
        mask = (torch.arange(L).view(1, L) < torch.as_tensor(seqlens).view(B, 1)).view(B, 1, 1, L)
    if gqa_mode == "enable_gqa":
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
    else:
        rep = Hq // Hkv
        o = F.scaled_dot_product_attention(qd, kd.repeat_interleave(rep, 1),
                                           vd.repeat_interleave(rep, 1), attn_mask=mask,
                                           scale=scale)
    return o.squeeze(2)


def _lse_loop(q, k, seqlens, scale):
    """Independent LSE: explicit loops over batch and query heads."""
    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    group = Hq // Hkv
    out = torch.empty(B, Hq, dtype=torch.float64)
    for b in range(B):
        n = L if seqlens is None else int(seqlens[b])
        for h in range(Hq):
            s = (k[b, h // group, :n].double() @ q[b, h].double()) * scale
            out[b, h] = torch.logsumexp(s, 0) if n else float("-inf")
    return out


@pytest.mark.parametrize("group", [1, 4, 5])
@pytest.mark.parametrize("gqa_mode", ["enable_gqa", "repeat_interleave"])
def test_matches_sdpa(group, gqa_mode):
    B, Hkv, L, D = 3, 2, 37, 64
    Hq = Hkv * group
    q, k, v = _qkv(B, Hq, Hkv, L, D, seed=10 + group)
    out, lse = decode_reference(q, k, v)
    assert out.shape == (B, Hq, D) and out.dtype == torch.float64
    assert lse.shape == (B, Hq) and lse.dtype == torch.float64
    ref = _sdpa(q, k, v, gqa_mode=gqa_mode)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, _lse_loop(q, k, None, 1 / math.sqrt(D)),
                               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("group", [1, 4, 5])
def test_seqlens_mask(group):
    B, Hkv, L, D = 4, 2, 50, 32
    Hq = Hkv * group
    q, k, v = _qkv(B, Hq, Hkv, L, D, seed=20 + group)
    seqlens = torch.tensor([50, 1, 17, 33])
    out, lse = decode_reference(q, k, v, seqlens=seqlens)
    ref = _sdpa(q, k, v, seqlens=seqlens)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, _lse_loop(q, k, seqlens, 1 / math.sqrt(D)),
                               atol=ATOL, rtol=RTOL)
    # equals attention over the truncated cache, sequence by sequence
    for b in range(B):
        n = int(seqlens[b])
        ob, lb = decode_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        torch.testing.assert_close(out[b:b + 1], ob, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lse[b:b + 1], lb, atol=ATOL, rtol=RTOL)
    # (finite) garbage past each length must not matter
    k2, v2 = k.clone(), v.clone()
    for b in range(B):
        k2[b, :, int(seqlens[b]):] = 1e6
        v2[b, :, int(seqlens[b]):] = -3e7
    out2, lse2 = decode_reference(q, k2, v2, seqlens=seqlens)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


def test_seqlen_one_returns_first_value():
    q, k, v = _qkv(2, 4, 2, 9, 16, seed=30)
    out, lse = decode_reference(q, k, v, seqlens=torch.tensor([1, 1]))
    expected = v[:, :, 0].repeat_interleave(2, 1)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    s0 = torch.einsum("bhd,bhd->bh", q, k[:, :, 0].repeat_interleave(2, 1)) / 4.0
    torch.testing.assert_close(lse, s0, atol=ATOL, rtol=RTOL)


def test_zero_length_sequence():
    B, Hq, Hkv, L, D = 3, 8, 2, 20, 64
    q, k, v = _qkv(B, Hq, Hkv, L, D, seed=40)
    seqlens = torch.tensor([7, 0, 20])
    out, lse = decode_reference(q, k, v, seqlens=seqlens)
    assert torch.equal(out[1], torch.zeros(Hq, D, dtype=torch.float64))
    assert torch.isneginf(lse[1]).all()
    assert torch.isfinite(out).all()
    assert torch.isfinite(lse[[0, 2]]).all()
    keep = [0, 2]
    ref = _sdpa(q[keep], k[keep], v[keep], seqlens=seqlens[keep])
    torch.testing.assert_close(out[keep], ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, _lse_loop(q, k, seqlens, 1 / math.sqrt(D)),
                               atol=ATOL, rtol=RTOL)


def test_all_zero_lengths():
    q, k, v = _qkv(2, 2, 1, 4, 8, seed=41)
    out, lse = decode_reference(q, k, v, seqlens=torch.tensor([0, 0]))
    assert torch.equal(out, torch.zeros(2, 2, 8, dtype=torch.float64))
    assert torch.isneginf(lse).all()


def test_lse_is_logsumexp_of_scaled_scores():
    B, Hq, Hkv, L, D = 2, 6, 3, 24, 128
    q, k, v = _qkv(B, Hq, Hkv, L, D, seed=50)
    scale = 1 / math.sqrt(D)
    _, lse = decode_reference(q, k, v)
    kr = k.repeat_interleave(Hq // Hkv, 1)
    s = torch.einsum("bhd,bhld->bhl", q, kr) * scale
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=ATOL, rtol=RTOL)
    # consistency: out == sum softmax(s) * v with softmax computed from lse
    out, _ = decode_reference(q, k, v)
    p = torch.exp(s - lse.unsqueeze(-1))
    torch.testing.assert_close(p.sum(-1), torch.ones(B, Hq, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    vr = v.repeat_interleave(Hq // Hkv, 1)
    torch.testing.assert_close(out, torch.einsum("bhl,bhld->bhd", p, vr),
                               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("scale", [0.5, 0.0, 2.0, 1e-3])
def test_custom_scale(scale):
    B, Hq, Hkv, L, D = 2, 4, 1, 16, 32
    q, k, v = _qkv(B, Hq, Hkv, L, D, seed=60)
    out, lse = decode_reference(q, k, v, scale=scale)
    ref = _sdpa(q, k, v, scale=scale)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, _lse_loop(q, k, None, scale), atol=ATOL, rtol=RTOL)
    if scale == 0.0:
        # uniform attention: mean of V, lse = log L
        torch.testing.assert_close(out, v.mean(2).repeat_interleave(Hq, 1), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lse, torch.full((B, Hq), math.log(L), dtype=torch.float64),
                                   atol=ATOL, rtol=RTOL)
    # differs from the default scale
    out_d, lse_d = decode_reference(q, k, v)
    assert not torch.allclose(lse, lse_d)


def test_default_scale_is_inv_sqrt_d():
    q, k, v = _qkv(1, 2, 2, 10, 64, seed=70)
    a = decode_reference(q, k, v)
    b = decode_reference(q, k, v, scale=0.125)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_query_head_reads_kv_head_h_div_group():
    """Hq = 4, Hkv = 2: heads 0, 1 read KV head 0; heads 2, 3 read KV head 1 (not h % Hkv)."""
    B, Hq, Hkv, L, D = 1, 4, 2, 8, 16
    g = _gen(80)
    q = torch.randn(B, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    v = torch.empty(B, Hkv, L, D, dtype=torch.float64)
    v[:, 0] = 1.0
    v[:, 1] = -1.0
    out, lse = decode_reference(q, k, v)
    expected = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(out[0], expected.view(Hq, 1).expand(Hq, D), atol=1e-12, rtol=0)
    for h in range(Hq):
        s = (k[0, h // 2] @ q[0, h]) / math.sqrt(D)
        torch.testing.assert_close(lse[0, h], torch.logsumexp(s, 0), atol=ATOL, rtol=RTOL)
        wrong = torch.logsumexp((k[0, h % 2] @ q[0, h]) / math.sqrt(D), 0)
        if h in (1, 2):
            assert not torch.allclose(lse[0, h], wrong)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_computed_in_float64(dtype):
    q, k, v = _qkv(2, 5, 1, 12, 32, seed=90, dtype=dtype)
    out, lse = decode_reference(q, k, v, seqlens=torch.tensor([12, 5]))
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    o64, l64 = decode_reference(q.double(), k.double(), v.double(), seqlens=torch.tensor([12, 5]))
    assert torch.equal(out, o64) and torch.equal(lse, l64)


def _prefill_brute(q, k, v, seqlens, qlens, scale):
    """Row by row: query i of sequence b at position seqlens[b] - qlens[b] + i."""
    B, Hq, Lq, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(min(Lq, qlens[b])):
                pos = seqlens[b] - qlens[b] + i
                if pos < 0:
                    continue
                s = (k[b, h // group, :pos + 1].double() @ q[b, h, i].double()) * scale
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h // group, :pos + 1].double()
    return out, lse


@pytest.mark.parametrize("qlens", [None, [5, 2, 0]])
def test_prefill_reference_matches_row_by_row(qlens):
    from hierasparse_gen.reference import prefill_reference
    q, k, v = _qkv(3, 4, 2, 9, 8, seed=5)
    q = torch.randn(3, 4, 5, 8, generator=_gen(6), dtype=torch.float64)
    seqlens = [9, 3, 6]  # sequence 1: 5 queries over 3 keys, so its first two queries see nothing
    ql = None if qlens is None else torch.tensor(qlens)
    out, lse = prefill_reference(q, k, v, torch.tensor(seqlens), scale=0.3, qlens=ql)
    ref, ref_lse = _prefill_brute(q, k, v, seqlens, qlens or [5, 5, 5], 0.3)
    assert torch.allclose(out, ref, atol=1e-12) and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-12)
    if qlens is not None:  # rows past qlens are padding: zeros and -inf
        assert (out[0, :, 5:] == 0).all() and (out[2] == 0).all() and torch.isneginf(lse[2]).all()
