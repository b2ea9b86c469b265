"""The e4m3 block format (format_fp8): rounding against an independent e4m3 table, scales, zero rows,
non-finite input, subnormals, the 2:4 forms' metadata and per-token scales, bit-exact round trips and
the byte counts."""

import pytest
import torch

from hierasparse_gen import format as fmt
from hierasparse_gen import format_fp8 as f8
from hierasparse_gen.errors import InputError


def _e4m3_table() -> torch.Tensor:
    """Value of every e4m3fn code from its bits (sign, 4 exponent bits of bias 7, 3 mantissa bits; exponent 0
    subnormal; S.1111.111 NaN), without torch's float8 type."""
    vals = []
    for code in range(256):
        s, e, m = code >> 7, (code >> 3) & 0xF, code & 7
        if e == 15 and m == 7:
            v = float("nan")
        elif e == 0:
            v = m / 8 * 2.0 ** -6
        else:
            v = (1 + m / 8) * 2.0 ** (e - 7)
        vals.append(-v if s else v)
    return torch.tensor(vals, dtype=torch.float64)


TABLE = _e4m3_table()


def _nearest_code(q: torch.Tensor) -> torch.Tensor:
    """Round float32 ``q`` (|q| <= 448) to the nearest e4m3 code by the table: the magnitude to the nearest of
    codes 0..126, ties to the even code (even mantissa), then the sign bit of q."""
    mags = TABLE[:127]
    d = (q.double().abs().unsqueeze(-1) - mags).abs()
    tie = d == d.min(-1, keepdim=True).values
    codes = torch.arange(127)
    even = torch.where(tie & (codes % 2 == 0), codes, 1000).amin(-1)
    pick = torch.where(even < 1000, even, torch.where(tie, codes, 1000).amin(-1))
    return (pick | torch.signbit(q).long() << 7).to(torch.uint8)


def test_the_table_matches_torch_float8():
    codes = torch.arange(256, dtype=torch.uint8)
    got = codes.view(torch.float8_e4m3fn).double()
    assert torch.equal(got.isnan(), TABLE.isnan())
    assert torch.equal(got[~got.isnan()], TABLE[~TABLE.isnan()])
    assert TABLE[0x7E] == f8.E4M3_MAX


def test_rounding_is_nearest_even_as_the_table_says():
    g = torch.Generator().manual_seed(0)
    finite = TABLE[~TABLE.isnan()].float()
    mids = (finite.sort().values[1:] + finite.sort().values[:-1]) / 2  # every tie
    rand = torch.randn(4000, generator=g) * torch.exp2(torch.randint(-12, 8, (4000,), generator=g).float())
    q = torch.cat((mids, finite, rand.clamp(-448, 448)))
    ones = torch.ones(q.shape[0], dtype=torch.float16)
    got = f8.quantize(q.view(-1, 1), ones).view(-1)
    assert torch.equal(got, _nearest_code(q))


def _tokens(g, S=64, D=64, lo=-6, hi=12):
    """Random tokens of magnitudes 2**lo to 2**hi; from lo = -6 up their scales are normal float16s."""
    return torch.randn(2, 3, S, D, generator=g) * torch.exp2(torch.randint(lo, hi, (2, 3, S, 1), generator=g).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_tokens_largest_value_maps_to_448_and_nothing_saturates(dtype):
    g = torch.Generator().manual_seed(1)
    x = _tokens(g, lo=-24, hi=16).clamp(-6e4, 6e4).to(dtype)
    codes, scales = f8.pack_dense(x)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float16 and scales.shape == x.shape[:-1]
    q = x.float() / scales.float().unsqueeze(-1)
    assert float(q.abs().max()) <= 448.0
    top = codes.view(torch.float8_e4m3fn).float().abs().amax(-1)
    normal = scales.float() >= 2 ** -14
    assert 0 < int(normal.sum()) < normal.numel()  # both kinds of scale occur
    assert torch.equal(top[normal], torch.full_like(top[normal], 448.0))
    # a subnormal float16 scale (tokens under 448 * 2**-14) maps the largest value lower, never higher
    assert bool((top[~normal] <= 448).all())
    # the rounded-up scale is the smallest float16 that keeps |x| / scale <= 448 (one step down would not)
    lower = (scales.view(torch.int16) - 1).view(torch.float16).float()
    assert bool((x.float().abs().amax(-1) / lower > 448).all())


def test_scales_chosen_adversarially_never_saturate():
    # amax / 448 just above a float16: rounding to nearest would saturate, rounding up must not
    h = torch.tensor([1.0, 0.0333, 3.0517578125e-05, 2.0, 1000.0], dtype=torch.float16).float()
    amax = (h * 448) * (1 + 2 ** -20)
    x = torch.stack((amax, -amax / 3), -1).unsqueeze(0)
    codes, scales = f8.pack_dense(x)
    assert bool((amax / scales.float() <= 448).all())
    assert torch.equal(codes[0, :, 0], torch.full((5,), 0x7E, dtype=torch.uint8))


def test_zero_rows_get_scale_one_and_come_back_as_zeros():
    x = torch.zeros(1, 1, 32, 64)
    x[0, 0, 5] = torch.linspace(-1, 1, 64)
    codes, scales = f8.pack_dense(x)
    assert scales[0, 0, 0] == 1 and scales[0, 0, 5] != 1
    assert int(codes[0, 0, 0].sum()) == 0
    back = f8.unpack_dense(codes, scales)
    assert torch.equal(back[0, 0, 0], torch.zeros(64))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_are_refused(bad):
    x = torch.randn(1, 1, 32, 64)
    x[0, 0, 3, 7] = bad
    for pack in (f8.pack_dense, f8.pack_k_2to4, f8.pack_v_2to4):
        with pytest.raises(InputError, match="inf or NaN.*Fix:"):
            pack(x)


def test_a_scale_beyond_float16_is_refused():
    x = torch.ones(1, 1, 32, 64)
    x[0, 0, 0, 0] = 1e9
    with pytest.raises(InputError, match="beyond float16.*Fix:"):
        f8.pack_dense(x)


def test_subnormals_round_as_torch_and_the_table():
    # one token spanning 448 down to 2**-12 of its scale: normals, subnormals and flushes to zero
    q = torch.cat((torch.tensor([448.0]), torch.exp2(-torch.arange(0, 13, 0.25))))
    x = (q * 0.5).view(1, 1, 1, -1)[..., :48]  # scale 0.5 / 448 * 448: exactly 2**-... multiples
    codes, scales = f8.pack_dense(x)
    quot = x.float() / scales.float().unsqueeze(-1)
    assert torch.equal(codes.view(-1), _nearest_code(quot.view(-1)))
    exp_field = (codes >> 3) & 0xF
    assert bool(((exp_field == 0) & (codes & 7 != 0)).any())  # some subnormal codes
    assert bool((codes == 0).any())  # and some flushed to zero
    err = (f8.unpack_dense(codes, scales) - x).abs()
    # half a step: 2**-4 of the value for normal codes, 2**-10 of the scale below 2**-6
    assert bool((err <= torch.maximum(x.abs() * 2 ** -4, scales.float().unsqueeze(-1) * 2 ** -10)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_round_trip_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(2)
    x = _tokens(g, hi=8).to(dtype)
    codes, scales = f8.pack_dense(x)
    ref = TABLE[codes.long()]
    back = f8.unpack_dense(codes, scales)
    assert torch.equal(back.double(), ref * scales.double().unsqueeze(-1))  # exact in float32
    # packing what came back gives the same bytes and scales again
    codes2, scales2 = f8.pack_dense(back)
    assert torch.equal(codes2, codes) and torch.equal(scales2, scales)
    # bytes against the independent rounding
    q = x.float() / scales.float().unsqueeze(-1)
    assert torch.equal(codes.view(-1), _nearest_code(q.view(-1)))


def test_k_2to4_keeps_by_the_original_values_with_the_dense_scales():
    g = torch.Generator().manual_seed(3)
    k = _tokens(g, S=64, D=64)
    vals, words, scales = f8.pack_k_2to4(k)
    assert vals.shape == (2, 3, 64, 32) and vals.dtype == torch.uint8
    assert words.shape == (2, 3, 64, 4) and words.dtype == torch.int16
    assert torch.equal(words, fmt.compress_rows(k)[1])
    codes, dense_scales = f8.pack_dense(k)
    assert torch.equal(scales, dense_scales)  # a token's largest value is always kept along head_dim
    keep = fmt.keep_mask_2to4(k)
    assert torch.equal(vals, codes[keep].view(vals.shape))
    back = f8.unpack_k_2to4(vals, words, scales)
    assert torch.equal(back, torch.where(keep, f8.unpack_dense(codes, scales), torch.zeros(())))
    assert torch.equal(f8.pack_k_2to4(back)[0], vals)  # round trip
    assert torch.equal(f8.pack_k_2to4(back)[1], words)


def test_keep_choice_before_quantization():
    # 1.0 and 1.02 quantize alike (e4m3 steps of 1/8 near 1); the original values decide, as in fp16
    k = torch.tensor([[1.0, 1.02, 0.1, 448.0] * 4]).view(1, 1, 1, 16).repeat(1, 1, 32, 1)
    k[..., 0] = 1.02
    k[..., 1] = 1.0
    vals, words, scales = f8.pack_k_2to4(k)
    assert torch.equal(words, fmt.compress_rows(k)[1])
    nib = int(words[0, 0, 0, 0]) & 0xF
    assert nib == 0 | (3 << 2)  # element 0 (1.02) and 3 (448), not element 1 (1.0)


def test_v_2to4_each_kept_value_has_its_own_tokens_scale():
    g = torch.Generator().manual_seed(4)
    v = _tokens(g, S=64, D=32, lo=0, hi=1)
    v[:, :, 3] *= 1e-3  # token 3 loses every channel to its group's neighbours: nothing kept
    # token 0's largest value (channel 5) is dropped: tokens 1 and 2 are larger there
    v[:, :, 0, 5], v[:, :, 1, 5], v[:, :, 2, 5] = 50.0, -100.0, 200.0
    vals, words, scales = f8.pack_v_2to4(v)
    assert vals.shape == (2, 3, 32, 32) and words.shape == (2, 3, 32, 4) and scales.shape == (2, 3, 64)
    assert torch.equal(words, fmt.compress_rows(v.transpose(-1, -2))[1])
    keep = fmt.keep_mask_2to4(v.transpose(-1, -2)).transpose(-1, -2)
    assert not bool(keep[:, :, 3].any()) and bool((scales[:, :, 3] == 1).all())
    kept_max = torch.where(keep, v.abs(), torch.zeros(())).amax(-1)
    assert torch.equal(scales, f8.token_scales(v, keep))
    some = kept_max > 0
    assert torch.equal(scales[some], f8.token_scales(kept_max.unsqueeze(-1))[some])  # the largest kept value
    assert bool((scales[some].float() <= f8.token_scales(v)[some].float()).all())  # never above the dense scale
    assert bool((scales[:, :, 0] < f8.token_scales(v)[:, :, 0]).any())  # token 0 lost its largest to neighbours
    back = f8.unpack_v_2to4(vals, words, scales)
    want = torch.where(keep, f8.dequantize(f8.quantize(v, scales), scales), torch.zeros(()))
    assert torch.equal(back, want)
    # the scale folds into P: O = sum_t p_t * v_t equals sum_t (p_t * scale_t) * e4m3_t
    p = torch.rand(2, 3, 64, dtype=torch.float64, generator=g)
    e = f8.dequantize(f8.quantize(v, scales), torch.ones_like(scales)).double() * keep
    o_fold = torch.einsum("bht,bhtd->bhd", p * scales.double(), e)
    # float64 sums of the same terms in another association: within rounding of the summed magnitudes
    mag = torch.einsum("bht,bhtd->bhd", p, back.double().abs())
    assert ((torch.einsum("bht,bhtd->bhd", p, back.double()) - o_fold).abs() <= 1e-13 * mag).all()
    again = f8.pack_v_2to4(back)
    assert torch.equal(again[0], vals) and torch.equal(again[1], words) and torch.equal(again[2], scales)


def test_2to4_shapes_are_checked():
    with pytest.raises(InputError, match="multiple of 16.*Fix:"):
        f8.pack_k_2to4(torch.randn(1, 1, 32, 24))
    with pytest.raises(InputError, match="tokens a multiple of 16.*Fix:"):
        f8.pack_v_2to4(torch.randn(1, 1, 24, 32))


@pytest.mark.parametrize("S,D", [(64, 64), (64, 128), (32, 256)])
def test_block_bytes_are_the_packed_tensors_bytes(S, D):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(S, D, generator=g)
    dense = sum(t.nbytes for t in f8.pack_dense(x))
    k24 = sum(t.nbytes for t in f8.pack_k_2to4(x))
    v24 = sum(t.nbytes for t in f8.pack_v_2to4(x))
    assert dense == f8.block_nbytes(S, D, storage="float8_e4m3", sparse=False, itemsize=2) == S * D + 2 * S
    assert k24 == v24 == f8.block_nbytes(S, D, storage="float8_e4m3", sparse=True, itemsize=2)
    assert k24 == S * D // 2 + S * D // 8 + 2 * S
    assert f8.SCALE_DTYPE.itemsize == f8.SCALE_BYTES
    k16 = sum(t.nbytes for t in fmt.compress_rows(x.half()))
    assert k16 == f8.block_nbytes(S, D, storage="model", sparse=True, itemsize=2)
    assert f8.block_nbytes(S, D, storage="model", sparse=False, itemsize=2) == S * D * 2
    with pytest.raises(InputError, match="not a storage.*Fix:"):
        f8.block_nbytes(S, D, storage="fp8", sparse=False, itemsize=2)


@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_stored_values_keep_the_dtype(kind, dtype):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 64, 64, generator=g).to(dtype)
    for sparse in (False, True):
        got = f8.stored_values(x, kind, sparse)
        assert got.dtype == dtype and got.shape == x.shape
        pruned = fmt.prune_k(x) if kind == "k" else fmt.prune_v(x)
        if sparse:
            assert torch.equal(got == 0, (pruned == 0) | (got == 0))  # zeros where 2:4 dropped
            assert bool((got[pruned == 0] == 0).all())
        rel = (got.float() - (pruned if sparse else x).float()).abs() / x.float().abs().amax(-1, keepdim=True)
        assert float(rel.max()) <= 2 ** -4 + 2 ** -8  # half an e4m3 step at the top, plus the dtype's rounding


@pytest.mark.parametrize("kind", ["k", "v"])
def test_fake_quantize_of_the_pruned_block_is_the_2to4_store(kind):
    g = torch.Generator().manual_seed(7)
    x = _tokens(g, S=64, D=64, lo=-4, hi=4)
    pruned = fmt.prune_k(x) if kind == "k" else fmt.prune_v(x)
    assert torch.equal(f8.fake_quantize(pruned), f8.stored_values(x, kind, True))
    assert torch.equal(f8.fake_quantize(x), f8.stored_values(x, kind, False))


@pytest.mark.parametrize("L", [1, 70, 128])
def test_kernel_layout_packers(L):
    """pack_k/pack_v: the logical e4m3 2:4 bytes in format.py's fragment order, the metadata exactly the
    model-dtype packer's, per-token scales; unpacking gives what stored_values says the cache holds."""
    g = torch.Generator().manual_seed(L)
    k = torch.randn(2, 3, L, 64, generator=g).to(torch.bfloat16)
    cap = fmt.round_capacity(L)
    padded = torch.cat((k, k.new_zeros(2, 3, cap - L, 64)), 2)
    for kind, pack, unpack, pack16 in (("k", f8.pack_k, f8.unpack_k, fmt.pack_k),
                                        ("v", f8.pack_v, f8.unpack_v, fmt.pack_v)):
        vals, meta, scales = pack(k)
        v16, m16 = pack16(k)
        assert vals.dtype == torch.uint8 and vals.shape == v16.shape and torch.equal(meta, m16)
        assert scales.shape == (2, 3, cap) and scales.dtype == torch.float16
        assert torch.equal(unpack(vals, meta, scales, torch.bfloat16), f8.stored_values(padded, kind, True))
        assert (scales[..., L:] == 1).all()  # padding tokens: zeros with scale 1


def test_dense_kernel_layout():
    """pack_k_dense/pack_v_dense: row-major e4m3 codes in the A-fragment order of mma.m16n8k16 (the module
    docstring's index formulas, checked element by element), and back."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 2, 64, 64, generator=g)
    codes, scales = f8.pack_dense(x)
    for pack, unpack, kind in ((f8.pack_k_dense, f8.unpack_k_dense, "k"), (f8.pack_v_dense, f8.unpack_v_dense, "v")):
        vals, sc = pack(x)
        assert torch.equal(sc, scales) and torch.equal(unpack(vals, sc), f8.unpack_dense(codes, scales))
        flat = vals[0, 1].reshape(-1)
        for T, ks, g_, q, j, hi, r8, lo in ((1, 1, 3, 2, 1, 1, 1, 0), (3, 0, 7, 3, 0, 0, 0, 1), (0, 1, 0, 1, 1, 0, 1, 1)):
            if kind == "k":  # [T, ks, g, q, j, hi, r8, lo]: token 16T + 8r8 + g, channel 32ks + 16j + 8hi + 2q + lo
                i = ((T * 2 + ks) * 32 + g_ * 4 + q) * 16 + j * 8 + hi * 4 + r8 * 2 + lo
                want = codes[0, 1, 16 * T + 8 * r8 + g_, 32 * ks + 16 * j + 8 * hi + 2 * q + lo]
            else:  # [c, mt, g, q, j, hi, r8, lo]: channel 16mt + 8r8 + g, token 32c + 16j + 8hi + 2q + lo
                c, mt = T // 2, ks + 2 * (T % 2)
                i = ((c * 4 + mt) * 32 + g_ * 4 + q) * 16 + j * 8 + hi * 4 + r8 * 2 + lo
                want = codes[0, 1, 32 * c + 16 * j + 8 * hi + 2 * q + lo, 16 * mt + 8 * r8 + g_]
            assert flat[i] == want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_model_dtype_2to4_is_the_unpacked_e4m3_under_the_same_metadata(dtype, D):
    """model_dtype_k/v (what prefill reads of e4m3 2:4): 16-bit values in the 16-bit kernel layout under the e4m3
    tensor's own metadata, holding bit for bit what unpack_k/v give in that dtype; V's values each take their
    own token's scale (found through the metadata), checked on scales that differ token to token."""
    g = torch.Generator().manual_seed(D)
    x = (torch.randn(2, 3, 70, D, generator=g) * torch.rand(2, 3, 70, 1, generator=g) * 40).to(dtype)
    for pack, unpack, to16, unpack16 in ((f8.pack_k, f8.unpack_k, f8.model_dtype_k, fmt.unpack_k),
                                          (f8.pack_v, f8.unpack_v, f8.model_dtype_v, fmt.unpack_v)):
        vals, meta, scales = pack(x)
        assert len(set(scales[0, 0].tolist())) > 30
        v16 = to16(vals, meta, scales, dtype)
        assert v16.dtype == dtype and v16.shape == vals.shape
        assert torch.equal(unpack16(v16, meta), unpack(vals, meta, scales, dtype))


def test_kept_positions_follow_the_metadata():
    x = torch.tensor([[0.0, 5, 0, 7, 1, 0, 0, 2, 0, 0, 3, 4, 9, 8, 0, 0]])
    vals, words = fmt.compress_rows(x)
    pos = f8.kept_positions(words)
    assert pos.tolist() == [[1, 3, 4, 7, 10, 11, 12, 13]]
    assert torch.equal(x.gather(-1, pos), vals)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_pools_of_an_e4m3_tensor_hold_what_the_cache_holds(dtype):
    """cache_inspect.prefill_pools (what the 16-bit prefill kernels read of an e4m3 tensor of HieraCache): through
    its table, the model-dtype dense slots, the e4m3 dense slots dequantized and the e4m3 2:4 slots as 16-bit 2:4
    under the same metadata give, block for block, block_rows' values in the cache's dtype."""
    from types import SimpleNamespace

    from hierasparse_gen.cache import _Tensor
    from hierasparse_gen.cache_inspect import DENSE8, block_rows, prefill_pools
    B, H, S, D, n_dense, n8, n_sp, blocks = 2, 3, 64, 64, 2, 3, 4, 8
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(B, H * (n8 + n_sp), S, D, generator=g) * 9).to(dtype)
    for name in "kv":
        dense8, sc8 = (f8.pack_k_dense if name == "k" else f8.pack_v_dense)(x[:, :H * n8], S)
        vals, meta, scales = (f8.pack_k if name == "k" else f8.pack_v)(x[:, H * n8:], S)
        t = _Tensor(name, 0.5, torch.randn(B, H, n_dense, S, D, generator=g).to(dtype),
                    vals.reshape(B, H, n_sp, -1), meta.reshape(B, H, n_sp, -1),
                    torch.tensor([0, DENSE8 + 2, -1, -4, DENSE8, 1, -2, DENSE8 + 1], dtype=torch.int32)
                    .repeat(B, H, 1), storage="float8_e4m3", dense8=dense8.reshape(B, H, n8, -1),
                    dense8_scales=sc8.reshape(B, H, n8, S), sparse_scales=scales.reshape(B, H, n_sp, S))
        cache = SimpleNamespace(batch=B, heads=H, block=S, head_dim=D, dtype=dtype, max_blocks=blocks)
        dense, vals16, meta16, table = prefill_pools(cache, t)
        assert vals16.dtype == dense.dtype == dtype and meta16 is t.sparse_meta and table.dtype == torch.int32
        rows, slot = block_rows(cache, t)
        want = rows.gather(2, slot.long()[..., None, None].expand(-1, -1, -1, S, D))
        unpack16 = fmt.unpack_k if name == "k" else fmt.unpack_v
        vshape, mshape = ((B, H * n_sp, S, D // 2), (B, H * n_sp, S, D // 16)) if name == "k" else \
            ((B, H * n_sp, S // 2, D), (B, H * n_sp, S // 16, D))
        sparse16 = unpack16(vals16.reshape(vshape), meta16.reshape(mshape)).reshape(B, H, n_sp, S, D)
        got = torch.cat((dense, sparse16), 2)
        got_slot = torch.where(table < 0, dense.shape[2] - table - 1, table).long()
        assert torch.equal(got.gather(2, got_slot[..., None, None].expand(-1, -1, -1, S, D)), want)
