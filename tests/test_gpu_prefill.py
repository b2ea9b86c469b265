"""GPU tests of the causal prefill kernels against the float64 reference on the same pruned
K/V: all-2:4 and balanced (dense K, 2:4 V) over flat tensors, and the block-table kernel
behind HieraCache.prefill in its three modes. Chunked prefill equals single-shot prefill
(the paper code's chunk-offset bug)."""

import pytest
import torch

from hierasparse_gen import format as fmt
from hierasparse_gen.cache import HieraCache
from helpers import cache_chunk as _cache_chunk, check_prefill as check, rand

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def lib(llama3):
    return llama3


def _inputs(B, Lq, L, dtype, seed, hq, hkv, d):
    k = rand(B, hkv, L, d, seed=seed, dtype=dtype)
    v = rand(B, hkv, L, d, seed=seed + 1, dtype=dtype)
    q = rand(B, hq, Lq, d, seed=seed + 2, dtype=dtype)
    return q, k, v


def _flat(lib, balanced, B, Lq, lengths, dtype, seed, L=None, hq=32, hkv=8, d=128, qlens=None, scale=None):
    """All-2:4 (or balanced: dense K) prefill of flat tensors against the reference."""
    q, k, v = _inputs(B, Lq, L or max(lengths), dtype, seed, hq, hkv, d)
    kc, vc = lib.compress_k(k), lib.compress_v(v)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    ql = None if qlens is None else torch.tensor(qlens, dtype=torch.int32, device="cuda")
    out, lse = lib.prefill(q, k if balanced else kc, vc, seqlens, qlens=ql, scale=scale)
    L = k.shape[2]  # the packed tensors are padded to whole 32-token pieces
    kp = k if balanced else fmt.unpack_k(kc.values, kc.meta)[:, :, :L]
    check(out, lse, q, kp, fmt.unpack_v(vc.values, vc.meta)[:, :, :L], seqlens, ql, scale)
    return out, lse


CASES = [
    (1, 1, [1]), (1, 17, [17]), (1, 64, [64]), (1, 95, [95]), (1, 97, [97]), (2, 100, [100, 300]),
    (3, 300, [300, 1000, 333]),
    (2, 40, [20, 2000]),  # sequence 0 has fewer keys than queries: its first queries see nothing
    (1, 1000, [1000]), (2, 333, [4097, 700]),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Lq,lengths", CASES)
@pytest.mark.parametrize("balanced", [False, True], ids=["all24", "balanced"])
def test_flat_prefill_matches_reference(lib, poison, balanced, dtype, B, Lq, lengths):
    _flat(lib, balanced, B, Lq, lengths, dtype, seed=B * 1000 + Lq)


@pytest.mark.parametrize("balanced", [False, True], ids=["all24", "balanced"])
def test_right_padded_batch(lib, poison, balanced):
    # three prompts of different lengths in one right-padded chunk: rows past qlens[b] are 0
    out, lse = _flat(lib, balanced, 3, 700, [700, 130, 451], torch.float16, seed=21, qlens=[700, 130, 451])
    assert (out[1, :, 130:] == 0).all() and torch.isneginf(lse[1, :, 130:]).all()


@pytest.mark.parametrize("scale", [0.3, -0.05, 0.0])
def test_scale(lib, poison, scale):
    # negative scales flip the order of scores (Q is negated in the kernel); 0 gives a mean
    _flat(lib, False, 1, 200, [333], torch.float16, seed=31, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,Hq,Hkv", [(64, 4, 4), (96, 10, 2), (128, 32, 8), (256, 16, 1)])
@pytest.mark.parametrize("balanced", [False, True], ids=["all24", "balanced"])
def test_flat_prefill_shapes(matrix, poison, balanced, dtype, D, Hq, Hkv):
    _flat(matrix, balanced, 2, 150, [150, 700], dtype, seed=D + Hq, hq=Hq, hkv=Hkv, d=D)


def _sampled(lib, balanced, L, seed, rows=((0, 96), (-300, None)), dtype=torch.float16):
    """Long prompts: the whole prompt in one launch, checked on some of its query rows (the
    float64 reference of all rows would not fit): rows a..b are the last b - a queries of a
    sequence of b keys."""
    q, k, v = _inputs(1, L, L, dtype, seed, 4, 1, 128)
    kc, vc = lib.compress_k(k), lib.compress_v(v)
    out, lse = lib.prefill(q, k if balanced else kc, vc)
    kp = k if balanced else fmt.unpack_k(kc.values, kc.meta)[:, :, :L]
    vp = fmt.unpack_v(vc.values, vc.meta)[:, :, :L]
    for a, b in rows:
        a, b = a % L, L if b is None else b
        n = torch.tensor([b], dtype=torch.int32, device="cuda")
        check(out[:, :, a:b], lse[:, :, a:b], q[:, :, a:b], kp[:, :, :b], vp[:, :, :b], n)


@pytest.mark.parametrize("L", [16384 + 5, 65536 - 3, 65536])
@pytest.mark.parametrize("balanced", [False, True], ids=["all24", "balanced"])
def test_long_prompt(lib, poison, balanced, L):
    _sampled(lib, balanced, L, seed=L % 1000, rows=((0, 96), (L // 2 - 50, L // 2 + 50), (-200, None)))


@pytest.mark.parametrize("balanced", [False, True], ids=["all24", "balanced"])
def test_chunked_prefill_equals_single_shot(lib, poison, balanced):
    L, chunk = 900, 300
    q, k, v = _inputs(2, L, L, torch.float16, 9, 32, 8, 128)
    kc, vc = lib.compress_k(k), lib.compress_v(v)
    kk = k if balanced else kc
    full, full_lse = lib.prefill(q, kk, vc, torch.tensor([L, L], dtype=torch.int32, device="cuda"))
    for off in range(0, L, chunk):
        part, part_lse = lib.prefill(q[:, :, off:off + chunk], kk, vc,
                                     torch.tensor([off + chunk] * 2, dtype=torch.int32, device="cuda"))
        # a chunk at offset `off` attends to everything before it and causally to itself
        assert torch.allclose(part.float(), full[:, :, off:off + chunk].float(), atol=2e-3, rtol=0)
        assert torch.allclose(part_lse, full_lse[:, :, off:off + chunk], atol=1e-4)


# --- HieraCache.prefill: the block-table kernel ---------------------------------------------

def _cache(lib, B, L, kr, vr, hq=32, hkv=8, d=128, dtype=torch.float16, **kw):
    return HieraCache(lib, batch=B, num_kv_heads=hkv, head_dim=d, max_seq_len=L, key_ratio=kr,
                      value_ratio=vr, dtype=dtype, **kw)


MODES = ["compress_then_attend", "attend_then_compress", "balanced"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kr,vr", [(0.5, 0.5), (1.0, 0.25), (0.0, 1.0)])
def test_cache_prefill_modes(lib, poison, mode, kr, vr):
    B, L = 3, 2000
    lengths = [2000, 1111, 700]  # different lengths in one right-padded chunk
    q, k, v = _inputs(B, L, L, torch.float16, 41, 32, 8, 128)
    cache = _cache(lib, B, 4096, kr, vr)
    _cache_chunk(cache, mode, q, k, v, lengths)
    assert cache.tiers("k").any() == (kr > 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L,kr,vr", [(2000, 0.5, 0.5), (1024, 1.0, 1.0), (777, 0.0, 1.0), (4160, 1.0, 0.25),
                                     (64, 1.0, 1.0), (1, 0.5, 0.5)])
def test_cache_prefill_of_a_whole_prompt(lib, poison, dtype, L, kr, vr):
    # a prompt into an empty cache, every sequence the whole chunk (compress_then_attend): on Hopper the sm_90a
    # kernel over the block tables takes it. Against the reference on the stored K/V, and against the
    # warp-level table kernel on the same cache.
    B = 2
    q, k, v = _inputs(B, L, L, dtype, 70 + L, 32, 8, 128)
    cache = _cache(lib, B, 4224, kr, vr, dtype=dtype)
    out = _cache_chunk(cache, "compress_then_attend", q, k, v, [L] * B)
    assert cache.tiers("k").any() == (kr > 0 and L >= 6 * 64) and cache.tiers("v").any() == (L >= 6 * 64)
    _against_warp_level(lib, cache, q, [L] * B, out)


def _against_warp_level(lib, cache, q, lengths, out, k_tail=None):
    """The chunk just prefilled (out: what cache.prefill returned) through the table kernels directly: on
    Hopper the sm_90a one must be what cache.prefill ran, and agree with the warp-level one on the same cache.
    k_tail: a whole prompt's dense K rows (the balanced mode)."""
    from hierasparse_gen.ops import prefill_cache
    find = dict(head_dim=128, dtype="float16" if q.dtype == torch.float16 else "bfloat16",
                cc=torch.cuda.get_device_capability(), group=4, tier=("mixed", "mixed"))
    wgmma = lib.find("prefill", family="wgmma", **find)
    if torch.cuda.get_device_capability() == (9, 0):
        assert wgmma, "the build has no sm_90a block-table kernel"
    qlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    tails = {} if k_tail is None else dict(k_tail=k_tail, tail_start=torch.zeros_like(qlens))
    warp_out, warp_lse = prefill_cache(lib, q, cache, cache.seqlens, qlens, kernel="mma_sp", **tails)
    launched = []
    function = lib.function
    lib.function = lambda symbol: launched.append(symbol) or function(symbol)  # which kernel runs
    try:
        wg_out, wg_lse = prefill_cache(lib, q, cache, cache.seqlens, qlens, whole=k_tail is not None, **tails)
    finally:
        del lib.function
    if wgmma:
        assert launched == [wgmma.symbol]
    assert torch.equal(wg_out, out)
    tol = 4e-3 if q.dtype == torch.float16 else 3e-2
    assert torch.allclose(wg_out.float(), warp_out.float(), atol=tol, rtol=0)
    assert torch.equal(torch.isfinite(wg_lse), torch.isfinite(warp_lse))
    finite = torch.isfinite(warp_lse)
    assert torch.allclose(wg_lse[finite], warp_lse[finite], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L,kr,vr", [(2000, 0.5, 1.0), (1024, 1.0, 0.25), (777, 0.0, 0.5), (1, 1.0, 1.0)])
def test_cache_balanced_prefill_of_a_whole_prompt(lib, poison, dtype, L, kr, vr):
    # the balanced mode on a prompt into an empty cache: the prompt's dense K rows are all its keys (the sm_90a
    # table kernel reads them through a tensor map over k), V through the table
    B = 2
    q, k, v = _inputs(B, L, L, dtype, 80 + L, 32, 8, 128)
    cache = _cache(lib, B, 4224, kr, vr, dtype=dtype)
    out = _cache_chunk(cache, "balanced", q, k, v, [L] * B)
    _against_warp_level(lib, cache, q, [L] * B, out, k_tail=k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cache_chunks_after_cached_tokens(lib, poison, dtype):
    # compress_then_attend chunks after cached tokens, as the sm_90a table kernel takes them: offsets that are
    # not multiples of 64 or 32, per-sequence lengths with padding rows (a whole padded CTA among them), a
    # sequence that skips a chunk, one-token chunks, a chunk longer than the window (blocks re-tiered while it
    # enters). Each chunk against the reference on the stored K/V and the warp-level kernel on the same cache.
    B = 3
    cache = _cache(lib, B, 4224, 0.5, 1.0, dtype=dtype)
    chunks = ([517, 300, 64], [700, 0, 129], [45, 333, 1000], [1, 1, 0], [300, 1, 128], [1200, 700, 66])
    for i, lengths in enumerate(chunks):
        L = max(lengths)
        q, k, v = _inputs(B, L, L, dtype, 90 + i, 32, 8, 128)
        out = _cache_chunk(cache, "compress_then_attend", q, k, v, lengths)
        _against_warp_level(lib, cache, q, lengths, out)
    assert cache.tiers("k").any() and cache.tiers("v").any()


@pytest.mark.parametrize("mode", MODES)
def test_cache_chunked_prefill(lib, poison, mode):
    # chunks at offsets that are not multiples of 32, a chunk longer than the window (blocks
    # re-tiered while it enters), and a sequence that skips a chunk
    B = 2
    cache = _cache(lib, B, 4096, 0.5, 0.5, dtype=torch.bfloat16)
    for i, lengths in enumerate(([517, 300], [700, 0], [45, 333], [1, 1])):
        L = max(lengths)
        q, k, v = _inputs(B, L, L, torch.bfloat16, 50 + i, 32, 8, 128)
        _cache_chunk(cache, mode, q, k, v, lengths)
    assert cache.tiers("k").any() and cache.tiers("v").any()


def _stale_nan_shared_memory(lib):
    """Leave NaN in the shared memory of every SM: the table kernels over a cache of NaN K/V (all dense blocks
    fill whole stages), on a grid that covers the GPU many times over. Shared memory is not cleared between
    kernels, so a kernel that reads stage bytes it never loaded then sees NaN."""
    nan = torch.full((4, 8, 2048, 128), float("nan"), dtype=torch.float16, device="cuda")
    cache = _cache(lib, 4, 2048, 0.0, 0.0)
    cache.prefill(nan, nan, q=torch.randn(4, 32, 2048, 128, dtype=torch.float16, device="cuda"))
    torch.cuda.synchronize()


def test_cache_chunk_ending_past_its_last_whole_slab(lib, poison):
    # a chunk whose last queries sit in a 64-key slab that reaches past the sequence's keys (cached + chunk
    # not a multiple of 64, the chunk's last 64-query block ending beyond them): the sm_90a kernel loads zero
    # tiles for the part past the keys, so stale NaN in shared memory cannot reach P.V. A sequence that stays
    # empty (0 keys, 0 queries: padding rows only) beside them.
    B = 3
    for cached, new in (([65, 100, 0], [5, 10, 0]), ([300, 64, 0], [45, 1, 0]), ([1, 129, 0], [62, 63, 0])):
        cache = _cache(lib, B, 1024, 1.0, 1.0)
        q, k, v = _inputs(B, max(cached), max(cached), torch.float16, 7 + cached[0], 32, 8, 128)
        cache.prefill(k, v, cached, q=q, mode="compress_then_attend")
        q, k, v = _inputs(B, max(new), max(new), torch.float16, 11 + cached[0], 32, 8, 128)
        _stale_nan_shared_memory(lib)
        out = _cache_chunk(cache, "compress_then_attend", q, k, v, new)
        _against_warp_level(lib, cache, q, new, out)
        assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("D,Hq,Hkv", [(64, 4, 4), (96, 10, 2), (256, 16, 1)])
def test_cache_prefill_shapes(matrix, poison, D, Hq, Hkv):
    # the block-table prefill, then the mixed-tier decode over the same dense and 2:4 blocks
    from helpers import check_against_reference
    cache = _cache(matrix, 2, 2048, 0.5, 0.75, hq=Hq, hkv=Hkv, d=D)
    for mode, lengths in (("balanced", [600, 300]), ("attend_then_compress", [77, 400])):
        L = max(lengths)
        q, k, v = _inputs(2, L, L, torch.float16, D + L, Hq, Hkv, D)
        _cache_chunk(cache, mode, q, k, v, lengths)
    assert cache.tiers("k").any() and (~cache.tiers("k")).any()
    qd = rand(2, Hq, D, seed=D)
    out, lse = cache.attend(qd)
    kd, vd = cache.to_dense()
    check_against_reference(out, lse, qd, kd, vd, cache.seqlens)


def test_cache_prefill_then_decode(lib, poison):
    # the chunk's K/V are in the cache afterwards: decode attends to them as stored
    from helpers import check_against_reference
    cache = _cache(lib, 2, 4096, 0.5, 0.5)
    q, k, v = _inputs(2, 1500, 1500, torch.float16, 61, 32, 8, 128)
    cache.prefill(k, v, [1500, 999], q=q, mode="balanced")
    qd = rand(2, 32, 128, seed=62)
    out, lse = cache.attend(qd)
    kd, vd = cache.to_dense()
    check_against_reference(out, lse, qd, kd, vd, cache.seqlens)


def test_cache_prefill_errors(lib):
    cache = _cache(lib, 1, 256, 0.5, 0.5)
    k = rand(1, 8, 200, 128, seed=1)
    q = rand(1, 32, 200, 128, seed=2)
    with pytest.raises(ValueError, match="mode 'dense' is not a prefill mode. Fix: use one of"):
        cache.prefill(k, k, q=q, mode="dense")
    with pytest.raises(ValueError, match=r"q: shape \(1, 32, 100, 128\) does not match the chunk"):
        cache.prefill(k, k, q=q[:, :, :100])
    with pytest.raises(ValueError, match=r"q: dtype torch.bfloat16 but the keys are torch.float16"):
        cache.prefill(k, k, q=q.bfloat16())
    with pytest.raises(ValueError, match=r"q: strides \(819200, 25600, 1, 200\) not supported. Fix: pass q.contiguous"):
        cache.prefill(k, k, q=q.transpose(2, 3).contiguous().transpose(2, 3))
    assert cache.lengths == [0]  # refused before anything entered the cache
    cache.prefill(k, k, q=q)
    from hierasparse_gen.cache import CacheFullError
    with pytest.raises(CacheFullError, match="nothing was written"):
        cache.prefill(k, k, q=q)
    assert cache.lengths == [200]


# --- the sm_90a wgmma kernel: whole prompts over all-2:4 K and V ------------------------------

def _count_wgmma_calls(lib, monkeypatch, tier, op_name):
    """Counts calls of an sm_90a prefill op (the query shapes); skips where the build or the device has no
    kernel of these tiers."""
    cc = torch.cuda.get_device_capability()
    if lib.find("prefill", family="wgmma", head_dim=128, dtype="float16", cc=cc, group=4, tier=tier) is None:
        pytest.skip(f"no sm_90a prefill kernel over {tier} for sm_{cc[0]}{cc[1]} in this build")
    calls = []
    op = getattr(torch.ops.hierasparse, op_name)

    def counted(*args):
        calls.append(args[1].shape)
        return op(*args)
    monkeypatch.setattr(torch.ops.hierasparse, op_name, counted)
    return calls


@pytest.fixture
def wgmma_calls(lib, monkeypatch):
    return _count_wgmma_calls(lib, monkeypatch, ("sparse24", "sparse24"), "prefill_wgmma")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# tails: 300 and 1050 put a partial and an empty copy into reused stages; capacity past the prompt
@pytest.mark.parametrize("B,L,cap", [(1, 128, None), (2, 384, None), (1, 2048, None), (1, 1, None), (2, 130, None),
                                     (1, 200, None), (1, 1000, None), (1, 2047, None), (1, 300, None),
                                     (2, 1050, None), (1, 333, 2048)])
def test_wgmma_prefill_matches_reference(lib, poison, wgmma_calls, dtype, B, L, cap):
    q, k, v = _inputs(B, L, L, dtype, 100 + L, 32, 8, 128)
    kc, vc = lib.compress_k(k, cap), lib.compress_v(v, cap)
    out, lse = lib.prefill(q, kc, vc)
    assert wgmma_calls == [q.shape]
    seqlens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    check(out, lse, q, fmt.unpack_k(kc.values, kc.meta)[:, :, :L], fmt.unpack_v(vc.values, vc.meta)[:, :, :L],
          seqlens)
    # the warp-level kernel (explicit seqlens route there) on the same inputs
    out2, lse2 = lib.prefill(q, kc, vc, seqlens)
    assert len(wgmma_calls) == 1
    assert (out.float() - out2.float()).abs().max().item() < (4e-3 if dtype == torch.float16 else 3e-2)
    assert torch.allclose(lse, lse2, atol=1e-3)


@pytest.mark.parametrize("q_gain,k_ramp", [(4.0, 0.0), (1.0, 3.0)])
def test_wgmma_prefill_exact_path(lib, poison, wgmma_calls, q_gain, k_ramp):
    # large scores and keys growing along the sequence: the lazy softmax must rescale often
    L = 1024
    q, k, v = _inputs(2, L, L, torch.float16, 7, 32, 8, 128)
    q = (q.float() * q_gain).half()
    k = (k.float() * (1 + k_ramp * torch.arange(L, device="cuda").view(1, 1, L, 1) / L)).half()
    kc, vc = lib.compress_k(k), lib.compress_v(v)
    out, lse = lib.prefill(q, kc, vc)
    assert len(wgmma_calls) == 1
    check(out, lse, q, fmt.unpack_k(kc.values, kc.meta)[:, :, :L], fmt.unpack_v(vc.values, vc.meta)[:, :, :L],
          torch.full((2,), L, dtype=torch.int32, device="cuda"))


def test_wgmma_prefill_one_query_with_any_row_stride(lib, poison, wgmma_calls):
    q, k, v = _inputs(1, 1, 1, torch.float16, 5, 32, 8, 128)
    q = q.as_strided(q.shape, (32 * 128, 128, 8, 1))  # row stride unused with one row
    kc, vc = lib.compress_k(k), lib.compress_v(v)
    out, lse = lib.prefill(q, kc, vc)
    assert len(wgmma_calls) == 1
    check(out, lse, q, fmt.unpack_k(kc.values, kc.meta)[:, :, :1], fmt.unpack_v(vc.values, vc.meta)[:, :, :1],
          torch.ones(1, dtype=torch.int32, device="cuda"))


def test_wgmma_prefill_strided_queries_and_scale(lib, poison, wgmma_calls):
    # q a slice of a longer buffer (row stride D, head stride 2L*D); an explicit negative scale
    L = 256
    big, k, v = _inputs(1, 2 * L, L, torch.float16, 11, 32, 8, 128)
    q = big[:, :, :L]
    kc, vc = lib.compress_k(k), lib.compress_v(v)
    out, lse = lib.prefill(q, kc, vc, scale=-0.05)
    assert len(wgmma_calls) == 1
    check(out, lse, q, fmt.unpack_k(kc.values, kc.meta)[:, :, :L], fmt.unpack_v(vc.values, vc.meta)[:, :, :L],
          torch.full((1,), L, dtype=torch.int32, device="cuda"), scale=-0.05)


def test_calls_the_wgmma_kernel_does_not_take_use_the_warp_level_one(lib, poison, wgmma_calls):
    # queries at the end of a longer sequence, explicit lengths
    for Lq, L, kw in ((128, 256, {}), (256, 256, {"qlens": [256]}), (200, 200, {"seqlens": [200]})):
        q, k, v = _inputs(1, Lq, L, torch.float16, Lq + L, 32, 8, 128)
        kc, vc = lib.compress_k(k), lib.compress_v(v)
        kw = {name: torch.tensor(x, dtype=torch.int32, device="cuda") for name, x in kw.items()}
        lib.prefill(q, kc, vc, **kw)
    assert wgmma_calls == []


# --- the sm_90a balanced kernel: whole prompts over dense K rows (TMA) and 2:4 V --------------

@pytest.fixture
def wgmma_kd_calls(lib, monkeypatch):
    return _count_wgmma_calls(lib, monkeypatch, ("dense", "sparse24"), "prefill_wgmma_balanced")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
# tails (partial last slabs: TMA zero-fills K rows past the tensor), reused stages, V capacity past the prompt,
# K longer than the prompt (its extra rows NaN: never read)
@pytest.mark.parametrize("B,L,cap,k_extra", [(1, 128, None, 0), (2, 384, None, 0), (1, 2048, None, 0), (1, 1, None, 0),
                                             (2, 130, None, 0), (1, 1000, None, 0), (1, 300, None, 0),
                                             (2, 1050, None, 0), (1, 333, 2048, 0), (1, 256, None, 40),
                                             (1, 300, None, 40)])
def test_wgmma_balanced_prefill_matches_reference(lib, poison, wgmma_kd_calls, dtype, B, L, cap, k_extra):
    q, k, v = _inputs(B, L, L + k_extra, dtype, 300 + L, 32, 8, 128)
    k[:, :, L:] = float("nan")
    vc = lib.compress_v(v[:, :, :L], cap)
    out, lse = lib.prefill(q, k, vc)  # dense K: the balanced tier
    assert wgmma_kd_calls == [q.shape]
    seqlens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    check(out, lse, q, k[:, :, :L], fmt.unpack_v(vc.values, vc.meta)[:, :, :L], seqlens)
    # the warp-level balanced kernel on the same inputs
    out2, lse2 = lib.prefill(q, k[:, :, :L], vc, seqlens)
    assert len(wgmma_kd_calls) == 1
    assert (out.float() - out2.float()).abs().max().item() < (4e-3 if dtype == torch.float16 else 3e-2)
    assert torch.allclose(lse, lse2, atol=1e-3)


def test_wgmma_balanced_prefill_strided_k_and_exact_path(lib, poison, wgmma_kd_calls):
    # K a slice of a longer buffer (head stride 2L*D), K in [B, L, Hkv, D] memory order (token stride Hkv*D,
    # head stride D: read in place by the tensor map) and K transposed in memory (copied first: the tensor map
    # needs contiguous channels); keys growing along the sequence, then large scores (the exact path)
    L = 512
    q, big, v = _inputs(2, L, 2 * L, torch.float16, 21, 32, 8, 128)
    k = (big[:, :, :L].float() * (1 + 3 * torch.arange(L, device="cuda").view(1, 1, L, 1) / L)).half()
    k_slice = torch.empty_like(big)
    k_slice[:, :, :L] = k
    vc = lib.compress_v(v[:, :, :L])
    seqlens = torch.full((2,), L, dtype=torch.int32, device="cuda")
    vd = fmt.unpack_v(vc.values, vc.meta)[:, :, :L]
    token_major = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert token_major.stride()[1:] == (128, 8 * 128, 1)
    for kk in (k_slice[:, :, :L], token_major, k.transpose(2, 3).contiguous().transpose(2, 3)):
        out, lse = lib.prefill(q, kk, vc)
        check(out, lse, q, k, vd, seqlens)
    q4 = (q.float() * 4).half()
    out, lse = lib.prefill(q4, k, vc)
    check(out, lse, q4, k, vd, seqlens)
    assert len(wgmma_kd_calls) == 4


def _e4m3_flat(lib, B, L, lengths, dtype, seed, k_sparse, hq=32, hkv=8, d=128, kernel="auto"):
    """Prefill over e4m3 K (2:4 or dense) and 2:4 e4m3 V: the output against the float64 reference on exactly the
    stored values (e4m3 code x float16 scale, exact in float32), within 4x the error of the torch math path on
    those values rounded into the model dtype, which is what the 16-bit kernels read (ops.as_model_dtype); the lse
    against the float64 reference on those rounded values (large-scale keys: the rounding alone moves scores of
    ~100 by more than the lse tolerance)."""
    from hierasparse_gen import format_fp8 as f8
    from helpers import _lowp
    from hierasparse_gen.reference import prefill_reference
    q, k, v = _inputs(B, L, L, dtype, seed, hq, hkv, d)
    k = k * torch.exp(rand(B, hkv, L, 1, seed=seed + 7, dtype=torch.float32) * 1.5).to(dtype)  # per-token scales differ
    kc = lib.compress_k(k, storage="float8_e4m3", sparse=k_sparse)
    vc = lib.compress_v(v, storage="float8_e4m3")
    seqlens = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out, lse = lib.prefill(q, kc, vc, seqlens, kernel=kernel)
    n = torch.full((B,), L, dtype=torch.int32, device="cuda") if seqlens is None else seqlens
    kx = (f8.unpack_k(kc.values, kc.meta, kc.scales) if k_sparse else f8.unpack_k_dense(kc.values, kc.scales))[:, :, :L]
    vx = f8.unpack_v(vc.values, vc.meta, vc.scales)[:, :, :L]
    ref, ref_lse = prefill_reference(q, kx, vx, n)
    assert out.shape == q.shape and not out.isnan().any(), "unwritten or NaN output"
    err = (out.double() - ref).abs().max().item()
    err_lowp = (_lowp(q, kx.to(dtype), vx.to(dtype), n).double() - ref).abs().max().item()
    assert err <= 4 * err_lowp + 1e-4, f"max error {err:.3g} vs same-precision torch {err_lowp:.3g}"
    ref_lse16 = prefill_reference(q, kx.to(dtype), vx.to(dtype), n)[1].to(lse.device)
    finite = torch.isfinite(ref_lse16)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse.double()[finite], ref_lse16[finite], atol=2e-3, rtol=1e-4), \
        (lse.double()[finite] - ref_lse16[finite]).abs().max().item()
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k_sparse", [True, False], ids=["k24f8", "kdf8"])
@pytest.mark.parametrize("B,L,lengths", [(1, 1000, None), (2, 333, None), (2, 700, [700, 130])])
def test_flat_prefill_over_e4m3(lib, poison, dtype, k_sparse, B, L, lengths):
    """lib.prefill over e4m3 PackedKV: whole prompts go to the sm_90a kernels (where built), explicit lengths to the
    warp-level ones, both on the values the e4m3 tensors hold."""
    out = _e4m3_flat(lib, B, L, lengths, dtype, seed=L + B, k_sparse=k_sparse)
    if lengths is None:  # the warp-level kernel on the same inputs
        out2 = _e4m3_flat(lib, B, L, lengths, dtype, seed=L + B, k_sparse=k_sparse, kernel="mma_sp")
        assert (out.float() - out2.float()).abs().max().item() < (4e-3 if dtype == torch.float16 else 3e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,Hq,Hkv", [(64, 4, 4), (96, 10, 2), (256, 16, 1)])
def test_flat_prefill_over_e4m3_shapes(matrix, poison, dtype, D, Hq, Hkv):
    _e4m3_flat(matrix, 2, 300, [300, 77], dtype, seed=D, k_sparse=D != 96, hq=Hq, hkv=Hkv, d=D)
