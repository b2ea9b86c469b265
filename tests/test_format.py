"""Tests for hierasparse_gen.format: 2:4 pruning, compression and the kernel fragment layout.

The layout spot checks recompute, from the formulas in format.py's module docstring (not
from its permutation code), where each kept value and each metadata register must land.
"""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hierasparse_gen import format as fmt  # noqa: E402
from hierasparse_gen.format import (  # noqa: E402
    CHUNK,
    VALID_NIBBLES,
    WORD,
    compensate_v,
    compress_rows,
    decompress_rows,
    keep_mask_2to4,
    pack_k,
    pack_v,
    packed_nbytes,
    prune_2to4,
    prune_k,
    prune_v,
    round_capacity,
    unpack_k,
    unpack_v,
)
from torch.sparse import _semi_structured_conversions as ssc  # noqa: E402

DTYPES16 = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(shape, dtype, seed):
    """Random normal data with no zeros (16-bit types may still have ties in a group)."""
    x = torch.randn(*shape, generator=_gen(seed), dtype=torch.float32)
    x = torch.where(x == 0, torch.full_like(x, 0.5), x)
    return x.to(dtype)


def _kept_pair(group) -> tuple[int, int]:
    """Independent rule: the 2 largest |x|, ties to the lower index; returned ascending."""
    order = sorted(range(4), key=lambda i: (-abs(float(group[i])), i))
    i0, i1 = sorted(order[:2])
    return i0, i1


def _word(row_vals, start: int) -> int:
    """16-bit metadata word of the 16 dense elements row_vals[start:start+16]."""
    w = 0
    for j in range(4):
        i0, i1 = _kept_pair(row_vals[start + 4 * j: start + 4 * j + 4])
        w |= (i0 | (i1 << 2)) << (4 * j)
    return w


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int32) & 0xFFFF
    return torch.stack([(w >> (4 * j)) & 0xF for j in range(4)], -1).flatten(-2)


# --- keep_mask_2to4 -------------------------------------------------------------------

@pytest.mark.parametrize(
    "group, expected",
    [
        ([1, 1, 1, 1], [1, 1, 0, 0]),
        ([0, 0, 0, 0], [1, 1, 0, 0]),
        ([-2, 2, 1, 1], [1, 1, 0, 0]),
        ([3, 0, 0, 3], [1, 0, 0, 1]),
        ([1, 2, 2, 2], [0, 1, 1, 0]),
        ([0, 0, 0, 5], [1, 0, 0, 1]),
        ([1, 1, 2, 1], [1, 0, 1, 0]),
        ([-1, 0.5, -1, 0.25], [1, 0, 1, 0]),
        ([0.25, -3, 0.5, 3], [0, 1, 0, 1]),
        ([0, -0.0, 0, 0], [1, 1, 0, 0]),
        ([1, 2, 3, 4], [0, 0, 1, 1]),
        ([4, 3, 2, 1], [1, 1, 0, 0]),
        ([2, 1, 1, 2], [1, 0, 0, 1]),
        ([1, 5, 1, 1], [1, 1, 0, 0]),
    ],
)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_keep_mask_explicit_ties(group, expected, dtype):
    x = torch.tensor(group, dtype=dtype)
    m = keep_mask_2to4(x)
    assert m.dtype == torch.bool
    assert m.tolist() == [bool(e) for e in expected]
    # same group embedded in a batch at several positions
    xb = torch.tensor([[7.0, 8.0, 9.0, 6.0] + group + [0.0, 0.0, 0.0, 1.0]], dtype=dtype)
    mb = keep_mask_2to4(xb)
    assert mb.shape == (1, 12)
    assert mb[0, 4:8].tolist() == [bool(e) for e in expected]
    assert mb[0, :4].tolist() == [False, True, True, False]
    assert mb[0, 8:].tolist() == [True, False, False, True]


def test_keep_mask_ties_after_rounding_bf16():
    # 1.0, 1.001 and 1.002 are distinct in float32 but equal in bfloat16: ties -> lower index
    x32 = torch.tensor([0.1, 1.0, 1.001, 1.002], dtype=torch.float32)
    assert keep_mask_2to4(x32).tolist() == [False, False, True, True]
    xb = x32.to(torch.bfloat16)
    assert keep_mask_2to4(xb).tolist() == [False, True, True, False]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(4,), (3, 16), (2, 5, 64), (2, 3, 4, 8)])
def test_keep_mask_random(dtype, shape):
    x = _randn(shape, dtype, seed=ALL_DTYPES.index(dtype) * 1000 + sum(shape))
    m = keep_mask_2to4(x)
    assert m.shape == x.shape and m.dtype == torch.bool
    mg = m.unflatten(-1, (-1, 4))
    assert (mg.sum(-1) == 2).all()
    a = x.abs().float().unflatten(-1, (-1, 4))
    kept_min = torch.where(mg, a, torch.full_like(a, float("inf"))).amin(-1)
    drop_max = torch.where(~mg, a, torch.full_like(a, -1.0)).amax(-1)
    assert (kept_min >= drop_max).all()
    # against the independent per-group rule
    flat = x.float().reshape(-1, 4).tolist()
    mflat = mg.reshape(-1, 4).tolist()
    for grp, mrow in zip(flat, mflat):
        i0, i1 = _kept_pair(grp)
        assert mrow == [i in (i0, i1) for i in range(4)]


def test_keep_mask_many_ties_random():
    # small integer values -> lots of ties; check against the independent rule
    x = torch.randint(-2, 3, (500, 4), generator=_gen(11)).to(torch.float16)
    m = keep_mask_2to4(x).tolist()
    for grp, mrow in zip(x.float().tolist(), m):
        i0, i1 = _kept_pair(grp)
        assert mrow == [i in (i0, i1) for i in range(4)], grp


@pytest.mark.parametrize("last", [1, 2, 3, 5, 6, 7, 10, 18])
def test_keep_mask_bad_last_dim(last):
    with pytest.raises(ValueError):
        keep_mask_2to4(torch.ones(2, last))
    with pytest.raises(ValueError):
        prune_2to4(torch.ones(2, last))


# --- prune_k / prune_v -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_prune_k_along_head_dim(dtype):
    B, H, L, D = 2, 3, 20, 64
    k = _randn((B, H, L, D), dtype, seed=21)
    pk = prune_k(k)
    assert pk.shape == k.shape and pk.dtype == k.dtype
    nz = (pk != 0).unflatten(-1, (-1, 4))
    assert (nz.sum(-1) == 2).all()
    assert (pk != 0).sum().item() * 2 == k.numel()
    # kept elements are unchanged, dropped are the smaller ones
    kept = pk != 0
    assert torch.equal(pk[kept], k[kept])
    a = k.abs().float().unflatten(-1, (-1, 4))
    nzf = kept.unflatten(-1, (-1, 4))
    kept_min = torch.where(nzf, a, torch.full_like(a, float("inf"))).amin(-1)
    drop_max = torch.where(~nzf, a, torch.full_like(a, -1.0)).amax(-1)
    assert (kept_min >= drop_max).all()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("L", [4, 32, 100])
def test_prune_v_along_tokens(dtype, L):
    """Regression: V is 2:4 along the sequence (dim -2), keeping exactly 50% of elements."""
    B, H, D = 2, 2, 64
    v = _randn((B, H, L, D), dtype, seed=31 + L)
    assert (v != 0).all()
    pv = prune_v(v)
    assert pv.shape == v.shape and pv.dtype == v.dtype
    nz = pv != 0
    # every group of 4 consecutive tokens of each channel keeps exactly 2
    per_group = nz.unflatten(-2, (-1, 4)).sum(-2)  # [B, H, L/4, D]
    assert per_group.shape == (B, H, L // 4, D)
    assert (per_group == 2).all()
    # exactly half of the elements are kept
    assert nz.sum().item() * 2 == v.numel()
    assert nz.float().mean().item() == 0.5
    kept_min = torch.where(nz, v.abs().float(), torch.full(v.shape, float("inf"))) \
        .unflatten(-2, (-1, 4)).amin(-2)
    drop_max = torch.where(~nz, v.abs().float(), torch.full(v.shape, -1.0)) \
        .unflatten(-2, (-1, 4)).amax(-2)
    assert (kept_min >= drop_max).all()
    assert torch.equal(pv[nz], v[nz])
    # identical to pruning V^T along its last dim
    assert torch.equal(pv, prune_k(v.transpose(-1, -2)).transpose(-1, -2))
    # and NOT pruned along head_dim: groups of 4 channels do not all keep exactly 2
    along_d = nz.unflatten(-1, (-1, 4)).sum(-1)
    assert not (along_d == 2).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prune_v_with_token_weights_compensates_the_dropped_pair(dtype):
    """With token weights w, V keeps per channel the 2 of 4 tokens of largest |v| * w and moves them so that the
    group's sum under m = w^2 is what the dense group's was (least-norm: d_i proportional to m_i), each kept value
    clipped to the group's largest |v|; groups of equal weights (tokens with no estimate) are only pruned."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 64, 16, generator=g).to(dtype)
    w = torch.rand(2, 64, 1, generator=g) * 2
    w[:, 32:48] = 1.0  # four groups of equal weights
    out = prune_v(v, w)
    assert out.dtype == dtype and out.shape == v.shape
    keep = keep_mask_2to4(v.transpose(-1, -2), w.expand_as(v).transpose(-1, -2)).transpose(-1, -2)
    assert torch.equal(out != 0, keep & (v != 0))  # the weighted choice (a kept exact zero may stay 0)
    x, o = v.float().unflatten(1, (16, 4)), out.float().unflatten(1, (16, 4))
    m = (w * w).unflatten(1, (16, 4))
    bound = x.abs().amax(2, keepdim=True)
    assert (o.abs() <= bound).all()
    moved = (o.abs() < bound).all(2)  # no kept value clipped (with weights in [0, 2], about half the groups)
    moved[:, 8:12] = False             # the equal-weight groups
    err = ((o * m).sum(2) - (x * m).sum(2)).abs()[moved]
    tol = (x.abs() * m).sum(2)[moved] * (2e-2 if dtype == torch.bfloat16 else 3e-3) + 1e-3
    assert moved.float().mean() > 0.25
    assert (err <= tol).all()
    assert torch.equal(out[:, 32:48], prune_2to4(v, -2)[:, 32:48])
    # uniform weights everywhere: the magnitude choice, nothing moved
    assert torch.equal(prune_v(v, torch.ones(2, 64, 1)), prune_v(v))


def _compensated_group(x, w):
    """The compressor kernel's float32 steps for one group (templates/cache/pack.cuh, select_2of4<true>), one
    IEEE operation at a time in numpy float32: the sequence format.compensate_v must reproduce bit for bit."""
    import numpy as np
    f = np.float32
    x, w = [f(float(t)) for t in x], [f(t) for t in w]
    a = [f(abs(x[i]) * w[i]) for i in range(4)]
    keep = [sum((a[j] > a[i]) or (a[j] == a[i] and j < i) for j in range(4)) < 2 for i in range(4)]
    i0, i1 = keep.index(True), 3 - keep[::-1].index(True)
    out = [f(0)] * 4
    out[i0], out[i1] = x[i0], x[i1]
    if len(set(w)) == 1:
        return out
    r, bound = f(0), f(0)
    for i in range(4):
        bound = max(bound, f(abs(x[i])))
        if i not in (i0, i1):
            r = f(r + f(f(w[i] * w[i]) * x[i]))
    m0, m1 = f(w[i0] * w[i0]), f(w[i1] * w[i1])
    den = max(f(f(m0 * m0) + f(m1 * m1)), f(1e-30))
    out[i0] = min(max(f(x[i0] + f(f(r * m0) / den)), -bound), bound)
    out[i1] = min(max(f(x[i1] + f(f(r * m1) / den)), -bound), bound)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compensate_v_is_the_kernels_float32_sequence(dtype):
    """format.compensate_v against the kernel's step-by-step float32 arithmetic (before the rounding to the model
    dtype), group by group, on random values and weights with ties, zeros and equal-weight groups."""
    g = torch.Generator().manual_seed(11)
    v = torch.randn(96, 8, generator=g).to(dtype)
    v[4:8, 0] = 0.0
    w = (torch.rand(96, 1, generator=g) * 3).round(decimals=1)  # ties among weights
    w[40:44] = 0.7
    out = compensate_v(v, w).float()
    assert (out != prune_2to4(v, -2, w).float()).sum() > 100  # the compensation is exercised, not only the choice
    for t in range(0, 96, 4):
        for c in range(8):
            want = torch.tensor(_compensated_group(v[t:t + 4, c].float().tolist(), w[t:t + 4, 0].tolist()))
            assert torch.equal(out[t:t + 4, c], want.to(dtype).float()), (t, c)


def test_prune_v_differs_from_prune_k():
    v = _randn((1, 1, 8, 8), torch.float16, seed=41)
    assert not torch.equal(prune_v(v), prune_k(v))


# --- compress_rows / decompress_rows ----------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("shape", [(16,), (5, 32), (2, 3, 128), (4, 256)])
def test_compress_round_trip(dtype, shape):
    x = prune_2to4(_randn(shape, dtype, seed=51 + shape[-1]))
    vals, words = compress_rows(x)
    K = shape[-1]
    assert vals.shape == (*shape[:-1], K // 2) and vals.dtype == dtype
    assert words.shape == (*shape[:-1], K // WORD) and words.dtype == torch.int16
    nib = _nibbles(words)
    assert nib.shape == (*shape[:-1], K // 4)
    assert torch.isin(nib, torch.tensor(VALID_NIBBLES, dtype=nib.dtype)).all()
    assert torch.equal(decompress_rows(vals, words), x)
    # values are the kept elements in ascending position order
    xg = x.reshape(-1, K // 4, 4)
    vg = vals.reshape(-1, K // 4, 2)
    ng = nib.reshape(-1, K // 4)
    i0, i1 = (ng & 3).long(), (ng >> 2).long()
    assert (i0 < i1).all()
    assert torch.equal(vg[..., 0], xg.gather(-1, i0.unsqueeze(-1)).squeeze(-1))
    assert torch.equal(vg[..., 1], xg.gather(-1, i1.unsqueeze(-1)).squeeze(-1))
    # nonzero positions of x are exactly the positions the nibbles name
    nzpos = (xg != 0)
    named = torch.zeros_like(nzpos)
    named.scatter_(-1, i0.unsqueeze(-1), True)
    named.scatter_(-1, i1.unsqueeze(-1), True)
    assert torch.equal(nzpos, named)


def test_compress_explicit_row():
    x = torch.tensor([[0, 5, 0, -1,   2, 0, 3, 0,   0, 0, 7, 8,   9, 4, 0, 0]],
                     dtype=torch.float16)
    vals, words = compress_rows(x)
    assert vals.tolist() == [[5, -1, 2, 3, 7, 8, 9, 4]]
    # nibbles: (1,3)->0xD, (0,2)->0x8, (2,3)->0xE, (0,1)->0x4
    assert (int(words[0, 0]) & 0xFFFF) == 0x4E8D
    assert words.dtype == torch.int16 and int(words[0, 0]) == 0x4E8D  # below 0x8000
    y = torch.tensor([[0, 0, 1, 1] * 3 + [1, 0, 0, 1]], dtype=torch.bfloat16)
    _, w = compress_rows(y)
    assert (int(w[0, 0]) & 0xFFFF) == 0xCEEE
    assert int(w[0, 0]) == 0xCEEE - 0x10000  # stored as a signed int16


def test_compress_unpruned_input_keeps_largest():
    x = _randn((3, 64), torch.float16, seed=61)
    vals, words = compress_rows(x)
    assert torch.equal(decompress_rows(vals, words), prune_2to4(x))


@pytest.mark.parametrize("last", [4, 8, 12, 20, 40])
def test_compress_bad_last_dim(last):
    with pytest.raises(ValueError):
        compress_rows(torch.ones(2, last, dtype=torch.float16))


# --- oracle: torch's CUTLASS conversion -------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("m, k", [(64, 128), (32, 256)])
def test_compress_matches_torch_cutlass(dtype, m, k):
    x = prune_2to4(_randn((m, k), dtype, seed=71 + m + k))
    assert ((x != 0).unflatten(-1, (-1, 4)).sum(-1) == 2).all()
    ref_vals, ref_meta_reordered = ssc.sparse_semi_structured_from_dense_cutlass(x)
    vals, words = compress_rows(x)
    assert torch.equal(vals, ref_vals)
    offsets = ssc._calculate_meta_reordering_scatter_offsets(m, k // 16, torch.int16, "cpu")
    ref_words = ref_meta_reordered.view(-1)[offsets].view(m, k // 16)
    assert ref_words.dtype == torch.int16
    assert torch.equal(words, ref_words)


# --- pack / unpack ------------------------------------------------------------------------

PACK_CASES = [
    (1, 1, 1, 64),
    (1, 2, 31, 96),
    (2, 1, 33, 128),
    (1, 1, 100, 256),
    (2, 3, 32, 64),
    (1, 2, 64, 96),
    (1, 1, 5, 128),
]


def _padded(x, cap):
    B, H, L, D = x.shape
    out = torch.zeros(B, H, cap, D, dtype=x.dtype)
    out[:, :, :L] = x
    return out


@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("B, H, L, D", PACK_CASES)
def test_pack_unpack_k(dtype, B, H, L, D):
    k = _randn((B, H, L, D), dtype, seed=81 + L + D)
    cap = round_capacity(L)
    vals, meta = pack_k(k)
    assert vals.shape == (B, H, cap, D // 2) and vals.dtype == dtype
    assert meta.shape == (B, H, cap, D // 16) and meta.dtype == torch.int16
    assert vals.is_contiguous() and meta.is_contiguous()
    dense = unpack_k(vals, meta)
    assert dense.shape == (B, H, cap, D) and dense.dtype == dtype
    assert torch.equal(dense[:, :, :L], prune_k(k))
    assert (dense[:, :, L:] == 0).all()
    # packing the unpacked tensor is a fixed point
    v2, m2 = pack_k(dense)
    assert torch.equal(v2, vals) and torch.equal(m2, meta)
    # every stored nibble is valid
    assert torch.isin(_nibbles(meta), torch.tensor(VALID_NIBBLES, dtype=torch.int32)).all()
    # the packed values hold exactly the kept elements (a permutation of compress_rows')
    lv, _ = compress_rows(_padded(k, cap))
    assert torch.equal(vals.reshape(B, H, -1).sort(-1).values,
                       lv.reshape(B, H, -1).sort(-1).values)


@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("B, H, L, D", PACK_CASES)
def test_pack_unpack_v(dtype, B, H, L, D):
    v = _randn((B, H, L, D), dtype, seed=91 + L + D)
    cap = round_capacity(L)
    vals, meta = pack_v(v)
    assert vals.shape == (B, H, cap // 2, D) and vals.dtype == dtype
    assert meta.shape == (B, H, cap // 16, D) and meta.dtype == torch.int16
    assert vals.is_contiguous() and meta.is_contiguous()
    dense = unpack_v(vals, meta)
    assert dense.shape == (B, H, cap, D) and dense.dtype == dtype
    expected = prune_v(_padded(v, cap))
    assert torch.equal(dense, expected)
    assert (dense[:, :, L:] == 0).all()
    L4 = L // 4 * 4
    if L4:
        assert torch.equal(dense[:, :, :L4], prune_v(v[:, :, :L4]))
    # exactly 2 kept per group of 4 tokens among full groups (random data has no zeros)
    if L4:
        assert ((dense[:, :, :L4] != 0).unflatten(-2, (-1, 4)).sum(-2) == 2).all()
    v2, m2 = pack_v(dense)
    assert torch.equal(v2, vals) and torch.equal(m2, meta)
    assert torch.isin(_nibbles(meta), torch.tensor(VALID_NIBBLES, dtype=torch.int32)).all()


@pytest.mark.parametrize("which", ["k", "v"])
def test_pack_explicit_capacity(which):
    B, H, L, D = 1, 2, 33, 64
    x = _randn((B, H, L, D), torch.float16, seed=101)
    pack, unpack = (pack_k, unpack_k) if which == "k" else (pack_v, unpack_v)
    prune = prune_k if which == "k" else prune_v
    vals, meta = pack(x, capacity=128)
    if which == "k":
        assert vals.shape == (B, H, 128, D // 2) and meta.shape == (B, H, 128, D // 16)
    else:
        assert vals.shape == (B, H, 64, D) and meta.shape == (B, H, 8, D)
    dense = unpack(vals, meta)
    assert dense.shape == (B, H, 128, D)
    assert torch.equal(dense, prune(_padded(x, 128)))
    assert (dense[:, :, L:] == 0).all()
    # capacity == L (a multiple of 32) works without padding
    y = _randn((B, H, 64, D), torch.bfloat16, seed=102)
    yv, ym = pack(y, capacity=64)
    assert torch.equal(unpack(yv, ym), prune(y))
    # default capacity equals explicit round_capacity
    d1 = pack(x)
    d2 = pack(x, capacity=round_capacity(L))
    assert torch.equal(d1[0], d2[0]) and torch.equal(d1[1], d2[1])


@pytest.mark.parametrize("pack", [pack_k, pack_v])
@pytest.mark.parametrize("L, cap", [(33, 48), (33, 32), (10, 16), (10, 40), (64, 32), (1, 0)])
def test_pack_bad_capacity(pack, L, cap):
    x = _randn((1, 1, L, 64), torch.float16, seed=111)
    with pytest.raises(ValueError):
        pack(x, capacity=cap)


@pytest.mark.parametrize("pack", [pack_k, pack_v])
@pytest.mark.parametrize("shape", [(4, 32), (1, 4, 32), (1, 1, 1, 4, 32)])
def test_pack_not_4d(pack, shape):
    with pytest.raises(ValueError):
        pack(torch.ones(*shape, dtype=torch.float16))


@pytest.mark.parametrize("pack", [pack_k, pack_v])
@pytest.mark.parametrize("D", [16, 48, 80, 100])
def test_pack_bad_head_dim(pack, D):
    with pytest.raises(ValueError):
        pack(torch.ones(1, 1, 32, D, dtype=torch.float16))


# --- layout spot checks (from the docstring's formulas) ---------------------------------

def _frag_lane_e(row: int, kc: int) -> tuple[int, int]:
    """(lane, e) of a 16 x 16-kept-column A tile element at tile row `row`, kept column `kc`.

    Fragment element e of lane l = 4g + q is row g + 8*((e>>1)&1), kept column
    2q + (e&1) + 8*(e>>2).
    """
    g, r8 = row % 8, row // 8
    hh, rem = divmod(kc, 8)
    q, lo = divmod(rem, 2)
    lane = 4 * g + q
    e = lo + 2 * r8 + 4 * hh
    # sanity: decode back
    assert g + 8 * ((e >> 1) & 1) == row
    assert 2 * q + (e & 1) + 8 * (e >> 2) == kc
    return lane, e


@pytest.mark.parametrize("D", [64, 96])
@pytest.mark.parametrize("dtype", DTYPES16)
def test_k_value_layout_spot(D, dtype):
    B, H, L = 2, 2, 45
    k = _randn((B, H, L, D), dtype, seed=121 + D)
    vals, _ = pack_k(k)
    cap = round_capacity(L)
    KS = D // 32
    kd = k.float()
    g = _gen(122)
    for _ in range(300):
        b = int(torch.randint(B, (1,), generator=g))
        h = int(torch.randint(H, (1,), generator=g))
        tok = int(torch.randint(cap, (1,), generator=g))
        grp = int(torch.randint(D // 4, (1,), generator=g))  # group along head_dim
        flat = vals[b, h].reshape(-1)
        if tok < L:
            four = kd[b, h, tok, 4 * grp: 4 * grp + 4].tolist()
        else:
            four = [0.0, 0.0, 0.0, 0.0]
        pair = _kept_pair(four)
        T, row = divmod(tok, 16)
        ks, j = divmod(grp, 8)  # k-step of 32 channels = 8 groups
        for slot in range(2):
            kc = 2 * j + slot
            lane, e = _frag_lane_e(row, kc)
            off = ((T * KS + ks) * 32 + lane) * 8 + e
            assert float(flat[off]) == four[pair[slot]], (b, h, tok, grp, slot)


@pytest.mark.parametrize("D", [64, 96])
def test_k_meta_layout_spot(D):
    B, H, L = 2, 2, 40
    k = _randn((B, H, L, D), torch.float16, seed=131 + D)
    _, meta = pack_k(k)
    cap = round_capacity(L)
    KS = D // 32
    kd = k.float()
    g = _gen(132)

    def row_vals(b, h, tok):
        return kd[b, h, tok].tolist() if tok < L else [0.0] * D

    for _ in range(150):
        b = int(torch.randint(B, (1,), generator=g))
        h = int(torch.randint(H, (1,), generator=g))
        T = int(torch.randint(cap // 16, (1,), generator=g))
        gg = int(torch.randint(8, (1,), generator=g))
        q = int(torch.randint(2, (1,), generator=g))
        ks = int(torch.randint(KS, (1,), generator=g))
        regs = meta[b, h].reshape(-1).view(torch.int32)
        assert regs.numel() == cap // 16 * 8 * 2 * KS
        reg = int(regs[((T * 8 + gg) * 2 + q) * KS + ks]) & 0xFFFFFFFF
        col = ks * 32 + 16 * q
        lo = _word(row_vals(b, h, T * 16 + gg), col)
        hi = _word(row_vals(b, h, T * 16 + gg + 8), col)
        assert reg == lo | (hi << 16), (b, h, T, gg, q, ks)
    # padding tokens: every group is [0,0,0,0] -> nibble 0x4 for both halves
    regs = meta[0, 0].reshape(-1).view(torch.int32)
    T = cap // 16 - 1  # tokens 48..63 are all padding for L = 40
    reg = int(regs[((T * 8 + 0) * 2 + 0) * KS + 0]) & 0xFFFFFFFF
    assert reg == 0x44444444


@pytest.mark.parametrize("D", [64, 96])
@pytest.mark.parametrize("dtype", DTYPES16)
def test_v_value_layout_spot(D, dtype):
    B, H, L = 2, 2, 70
    v = _randn((B, H, L, D), dtype, seed=141 + D)
    vals, _ = pack_v(v)
    cap = round_capacity(L)
    MT = D // 16
    vd = v.float()
    g = _gen(142)
    for _ in range(300):
        b = int(torch.randint(B, (1,), generator=g))
        h = int(torch.randint(H, (1,), generator=g))
        ch = int(torch.randint(D, (1,), generator=g))
        tgrp = int(torch.randint(cap // 4, (1,), generator=g))  # group of 4 tokens
        four = [float(vd[b, h, t, ch]) if t < L else 0.0
                for t in range(4 * tgrp, 4 * tgrp + 4)]
        pair = _kept_pair(four)
        C, j = divmod(tgrp, 8)  # chunk of 32 tokens = 8 groups
        mt, row = divmod(ch, 16)
        flat = vals[b, h].reshape(-1)
        for slot in range(2):
            lane, e = _frag_lane_e(row, 2 * j + slot)
            off = ((C * MT + mt) * 32 + lane) * 8 + e
            assert float(flat[off]) == four[pair[slot]], (b, h, ch, tgrp, slot)


@pytest.mark.parametrize("D", [64, 96])
def test_v_meta_layout_spot(D):
    B, H, L = 2, 2, 70
    v = _randn((B, H, L, D), torch.bfloat16, seed=151 + D)
    _, meta = pack_v(v)
    cap = round_capacity(L)
    MT = D // 16
    vd = v.float()
    g = _gen(152)

    def channel_tokens(b, h, ch):
        col = vd[b, h, :, ch].tolist()
        return col + [0.0] * (cap - L)

    for _ in range(150):
        b = int(torch.randint(B, (1,), generator=g))
        h = int(torch.randint(H, (1,), generator=g))
        C = int(torch.randint(cap // CHUNK, (1,), generator=g))
        gg = int(torch.randint(8, (1,), generator=g))
        q = int(torch.randint(2, (1,), generator=g))
        mt = int(torch.randint(MT, (1,), generator=g))
        regs = meta[b, h].reshape(-1).view(torch.int32)
        assert regs.numel() == cap // CHUNK * 8 * 2 * MT
        reg = int(regs[((C * 8 + gg) * 2 + q) * MT + mt]) & 0xFFFFFFFF
        start = C * 32 + 16 * q
        lo = _word(channel_tokens(b, h, mt * 16 + gg), start)
        hi = _word(channel_tokens(b, h, mt * 16 + gg + 8), start)
        assert reg == lo | (hi << 16), (b, h, C, gg, q, mt)


def test_layout_spot_is_sensitive():
    """Sanity of the spot-check helpers: swapping two tiles' data changes the checked value."""
    k = _randn((1, 1, 32, 64), torch.float16, seed=161)
    vals, _ = pack_k(k)
    lane, e = _frag_lane_e(3, 5)
    off_t0 = ((0 * 2 + 0) * 32 + lane) * 8 + e
    off_t1 = ((1 * 2 + 0) * 32 + lane) * 8 + e
    flat = vals[0, 0].reshape(-1)
    assert float(flat[off_t0]) != float(flat[off_t1])


# --- sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("B, H, L, D", [(1, 1, 1, 64), (2, 3, 33, 128), (1, 2, 100, 96)])
def test_packed_nbytes(dtype, B, H, L, D):
    x = _randn((B, H, L, D), dtype, seed=171)
    cap = round_capacity(L)
    kv, km = pack_k(x)
    vv, vm = pack_v(x)
    n = packed_nbytes(B, H, cap, D)
    assert n == kv.nbytes + km.nbytes
    assert n == vv.nbytes + vm.nbytes
    dense_bytes = B * H * cap * D * 2
    assert n * 16 == dense_bytes * 9


def test_packed_nbytes_fp32():
    x = _randn((1, 2, 40, 64), torch.float32, seed=172)
    kv, km = pack_k(x)
    assert kv.dtype == torch.float32
    assert packed_nbytes(1, 2, 64, 64, itemsize=4) == kv.nbytes + km.nbytes


@pytest.mark.parametrize("length, cap", [
    (0, 32), (1, 32), (31, 32), (32, 32), (33, 64), (64, 64), (65, 96), (100, 128),
    (4096, 4096), (4097, 4128),
])
def test_round_capacity(length, cap):
    assert round_capacity(length) == cap
    assert cap % CHUNK == 0 and cap >= length


def test_round_capacity_minimal():
    for n in range(0, 300):
        c = round_capacity(n)
        assert c % CHUNK == 0 and c >= max(n, 1)
        assert c == CHUNK or c - CHUNK < n


def test_constants():
    assert CHUNK == 32 and WORD == 16
    # valid nibbles are exactly i0 | i1 << 2 with i0 < i1
    assert sorted(VALID_NIBBLES) == sorted(i0 | (i1 << 2) for i0 in range(4)
                                           for i1 in range(4) if i0 < i1)
    assert fmt.CHUNK == CHUNK
