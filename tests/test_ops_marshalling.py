"""The custom ops' calls into the C ABI, checked on the CPU: a stand-in library records each
call, and every argument must convert to the ctypes type the entry point declares."""

import ctypes
from types import SimpleNamespace

import pytest
import torch

from hierasparse_gen import ops, registry
from hierasparse_gen.abi import SIGNATURES
from hierasparse_gen.errors import DispatchError, InputError
from hierasparse_gen.ops import base, cache_kernels, checks, decoding, packing
from hierasparse_gen.variants import COMPRESS_ABI, COMPRESS_E4M3_ABI

B, HQ, HKV, D, CAP = 2, 8, 2, 64, 128


class FakeLib:
    key = "fake-library"

    def __init__(self):
        self.calls = []
        self.wgmma = False  # whether an sm_90a prefill kernel "exists"

    def select(self, kind, family=None, **want):
        if family == "wgmma":
            if not self.wgmma:
                raise DispatchError("no wgmma kernel")
            kd = "_kd" if want.get("tier") == ("dense", "sparse24") else ""
            return SimpleNamespace(symbol=f"hsg_prefill_sm90a{kd}", **want)
        tiles = {"warps": 4, "stages": 2, "chunk_tokens": 32}
        mixed = want.get("tier") == ("mixed", "mixed") and kind == "decode"
        return SimpleNamespace(symbol=f"hsg_{kind}{'_mixed' if mixed else ''}", arch="sm_90", tiles=tiles,
                               smem_bytes=100_000, threads=128, kind="decode_table" if mixed else kind,
                               abi=COMPRESS_E4M3_ABI if kind == "compress" else kind)

    def find(self, kind, **want):
        try:
            return self.select(kind, **want)
        except DispatchError:
            return None


@pytest.fixture
def lib(monkeypatch):
    fake = FakeLib()
    monkeypatch.setitem(registry._LIBRARIES, fake.key, fake)
    monkeypatch.setattr(base, "device_cc", lambda device: (9, 0))
    monkeypatch.setattr(base, "sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(checks, "check_cuda", lambda t, what: None)  # CPU tensors stand in for GPU ones
    monkeypatch.setattr(base, "launch", lambda lib, symbol, device, *args: lib.calls.append((symbol, args)))
    return fake


def _assert_matches_signature(kind: str, suffix: str, args) -> None:
    argtypes = SIGNATURES[(kind, suffix)]
    assert len(args) + 1 == len(argtypes)  # + the stream, appended by _launch
    for value, ctype in zip(args, argtypes):
        if value is None:
            assert ctype is ctypes.c_void_p
        elif ctype is ctypes.c_void_p:
            assert isinstance(value, int) and value > 0
        else:
            ctype(value)  # raises TypeError when the value does not fit the declared type


def _packed(dtype=torch.float16):
    return (torch.zeros(B, HKV, CAP, D // 2, dtype=dtype), torch.zeros(B, HKV, CAP, D // 16, dtype=torch.int16),
            torch.zeros(B, HKV, CAP // 2, D, dtype=dtype), torch.zeros(B, HKV, CAP // 16, D, dtype=torch.int16))


@pytest.mark.parametrize("splits", [0, 1, 3])
def test_decode_op_arguments(lib, splits):
    q = torch.randn(B, HQ, D, dtype=torch.float16)
    seqlens = torch.tensor([CAP, 5], dtype=torch.int32)
    out, lse = decoding._decode_op(lib.key, q, *_packed(), seqlens, 0.125, splits)
    assert out.shape == (B, HQ, D) and lse.shape == (B, HQ)
    (symbol, args), = lib.calls
    assert symbol == "hsg_decode"
    _assert_matches_signature("decode", "", args)
    assert args[8:13] == (B, HKV, CAP, 0.125, args[12]) and args[12] >= 1
    assert (args[13] is None) == (args[12] == 1)  # partials only with several splits


@pytest.mark.parametrize("k8", [True, False])
def test_decode8_op_arguments(lib, k8):
    """e4m3 tensors: the tier key names the storages, the decode8 ABI takes each tensor's scales after its
    metadata (null for a model-dtype K)."""
    q = torch.randn(B, HQ, D, dtype=torch.float16)
    kv, km, vv, vm = _packed(torch.uint8)
    if not k8:
        kv = kv.half()
    ks, vs = torch.ones(B, HKV, CAP, dtype=torch.float16), torch.ones(B, HKV, CAP, dtype=torch.float16)
    seqlens = torch.tensor([CAP, 5], dtype=torch.int32)
    decoding._decode_op(lib.key, q, kv, km, vv, vm, seqlens, 0.125, 0, ks if k8 else None, vs)
    (symbol, args), = lib.calls
    _assert_matches_signature("decode8", "", args)
    assert args[3:9] == (kv.data_ptr(), km.data_ptr(), ks.data_ptr() if k8 else None, vv.data_ptr(),
                         vm.data_ptr(), vs.data_ptr())
    assert decoding.flat_tier(km, vm, ks if k8 else None, vs) == \
        ("sparse24", "sparse24", "float8_e4m3" if k8 else "model", "float8_e4m3")
    assert decoding.flat_tier(km, vm, None, None) == ("sparse24", "sparse24")
    assert decoding.flat_tier(None, vm, ks, vs) == ("dense", "sparse24", "float8_e4m3", "float8_e4m3")


def test_decode8_dense_op_arguments(lib):
    """Dense e4m3 K and V: no metadata (null pointers), the dense tier key."""
    q = torch.randn(B, HQ, D, dtype=torch.float16)
    kv, vv = torch.zeros(B, HKV, CAP, D, dtype=torch.uint8), torch.zeros(B, HKV, CAP, D, dtype=torch.uint8)
    ks, vs = torch.ones(B, HKV, CAP, dtype=torch.float16), torch.ones(B, HKV, CAP, dtype=torch.float16)
    decoding._decode_op(lib.key, q, kv, None, vv, None, torch.tensor([CAP, 5], dtype=torch.int32), 0.125, 1, ks, vs)
    (symbol, args), = lib.calls
    _assert_matches_signature("decode8", "", args)
    assert args[3:9] == (kv.data_ptr(), None, ks.data_ptr(), vv.data_ptr(), None, vs.data_ptr())
    assert args[10:13] == (B, HKV, CAP)


@pytest.mark.parametrize("kind,sparse", [("k", True), ("v", True), ("k", False), ("v", False)])
def test_compress8_arguments(lib, kind, sparse):
    """A library with the e4m3 packers (its e4m3 compression ABI): the entry point by tensor and tier, its arguments, the
    shapes of what comes back."""
    x = torch.randn(B, HKV, 100, D, dtype=torch.bfloat16)
    packed = packing.compress(lib, x, kind, None, "float8_e4m3", sparse)
    (symbol, args), = lib.calls
    assert symbol == f"hsg_compress_{kind}{'' if sparse else 'd'}8"
    _assert_matches_signature(COMPRESS_E4M3_ABI, f"_{kind}{'' if sparse else 'd'}8", args)
    assert args[4:8] == (B, HKV, 100, CAP) and (args[9] is None) == (not sparse)
    assert packed.values.dtype == torch.uint8 and packed.scales.shape == (B, HKV, CAP)
    assert packed.capacity == CAP and packed.head_dim == D and packed.sparse == sparse
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="inf or NaN"):
        packing.compress(lib, bad, kind, None, "float8_e4m3", sparse)


def _cache_pools():
    """A block table of 4 blocks, 3 dense and 2:4 slots of 64 tokens, as HieraCache holds them."""
    return (torch.zeros(B, HKV, 4, dtype=torch.int32), torch.zeros(B, HKV, 3, 64, D, dtype=torch.float16),
            torch.zeros(B, HKV, 2, 64 * D // 2, dtype=torch.float16),
            torch.zeros(B, HKV, 2, 64 * D // 16, dtype=torch.int16))


def test_decode_table_op_arguments(lib):
    q = torch.randn(B, HQ, D, dtype=torch.float16)
    table, dense, vals, meta = _cache_pools()
    cache_kernels._decode_table_op(lib.key, q, table, table, dense, dense, vals, meta, vals, meta,
                         torch.tensor([100, 7], dtype=torch.int32), 64, 0.0, 2)
    (symbol, args), = lib.calls
    _assert_matches_signature("decode_table", "", args)
    assert args[5] == 4 and args[8:10] == (3, 3) and args[14:16] == (2, 2) and args[19] == 0.0


def _pools8():
    """One e4m3 tensor's pools beside _cache_pools: 2 dense e4m3 slots, and the 2:4 slots' scales."""
    return (torch.zeros(B, HKV, 2, 64 * D, dtype=torch.uint8), torch.ones(B, HKV, 2, 64, dtype=torch.float16),
            torch.ones(B, HKV, 2, 64, dtype=torch.float16))


def test_decode_table8_op_arguments(lib, monkeypatch):
    """The block-table decode with e4m3 V (K in the model dtype): V's e4m3 pools after the 2:4 slot counts, nulls
    and 0 for K's, and the variant asked for by its storages."""
    asked = []
    select = lib.select
    monkeypatch.setattr(lib, "select", lambda kind, **want: asked.append(want.get("tier")) or select(kind, **want))
    q = torch.randn(B, HQ, D, dtype=torch.float16)
    table, dense, vals, meta = _cache_pools()
    dense8, dscales, sscales = _pools8()
    empty = torch.empty(0, dtype=torch.uint8)
    cache_kernels._decode_table8_op(lib.key, q, table, table, dense, dense, vals, meta, vals, meta, empty, empty,
                                    empty, dense8, dscales, sscales, torch.tensor([100, 7], dtype=torch.int32), 64,
                                    "model", "float8_e4m3", 0.0, 2)
    (symbol, args), = lib.calls
    _assert_matches_signature("decode_table8", "", args)
    assert asked == [("mixed", "mixed", "model", "float8_e4m3")]
    assert args[16:20] == (None, None, None, 0)
    assert args[20:24] == (dense8.data_ptr(), dscales.data_ptr(), sscales.data_ptr(), 2)


def test_cache_fill8_and_append8_arguments(lib):
    x = torch.randn(B, HKV, 200, D, dtype=torch.float16)
    table, dense, vals, meta = _cache_pools()
    t = SimpleNamespace(dense=dense, sparse_vals=torch.zeros(B, HKV, 2, 64 * D // 2, dtype=torch.uint8), sparse_meta=meta,
                        dense8=_pools8()[0], dense8_scales=_pools8()[1], sparse_scales=_pools8()[2])
    w = torch.ones(B, HKV, 256)
    cache_kernels.fill_blocks8(lib, x, "v", t, 64, table, slice(0, B), w)
    (symbol, args), = lib.calls
    assert symbol == "hsg_compress_fill_v8"
    _assert_matches_signature(COMPRESS_E4M3_ABI, "_fill_v8", args)
    assert args[4:7] == (B, HKV, 200) and args[8:10] == (4, 64) and args[18] == 2 and args[19] == w.data_ptr()
    lib.calls.clear()
    k = torch.randn(B, HKV, D, dtype=torch.float16)
    ctrl = torch.zeros(B, 6 + 3 + 3, dtype=torch.int32)
    empty = torch.empty(0, dtype=torch.uint8)
    cache_kernels._cache_append8_impl(lib.key, k, k, torch.tensor([100, 7], dtype=torch.int32), ctrl, table, dense,
                                      vals, meta, table, dense, vals, meta, *_pools8(), empty, empty, empty, 64, 1,
                                      4, 256, 0.5, 1.0, None, torch.ones(B, HKV, 256), torch.ones(B, HKV, 4))
    (symbol, args), = lib.calls
    assert symbol == "hsg_compress_append8"
    _assert_matches_signature(COMPRESS_E4M3_ABI, "_append8", args)
    assert args[30:34][3] == 2 and args[34:38] == (None, None, None, 0)  # K's e4m3 pools, V's none


# positions in the prefill C call: K source at 4..16, V source at 17..29 (table, max_blocks,
# block, dense, n_dense, vals, meta, n_sparse, tail, 3 tail strides, tail_start), then seqlens,
# qlens, max_len, batch, Hq, Hkv, Lq, scale, out, 3 out strides, lse
K_SRC, V_SRC, REST = 4, 17, 30


def _pk(dtype=torch.float16):
    kv, km, vv, vm = _packed(dtype)
    return ops.PackedKV(kv, km, "k", CAP - 3), ops.PackedKV(vv, vm, "v", CAP - 3)


@pytest.mark.parametrize("balanced", [False, True])
def test_prefill_op_arguments(lib, balanced):
    q = torch.randn(B, HQ, 10, D, dtype=torch.bfloat16)
    k, v = _pk(torch.bfloat16)
    kd = torch.randn(B, HKV, CAP - 3, D, dtype=torch.bfloat16)
    out, lse = ops.prefill(lib, q, kd if balanced else k, v, torch.tensor([CAP, 12], dtype=torch.int32),
                           qlens=torch.tensor([10, 3], dtype=torch.int32), scale=0.5)
    assert out.shape == q.shape and lse.shape == (B, HQ, 10)
    (symbol, args), = lib.calls
    _assert_matches_signature("prefill", "", args)
    assert args[REST + 2:REST + 8] == (CAP - 3, B, HQ, HKV, 10, 0.5)  # max_len = the shorter of K and V
    assert args[REST + 1] is not None
    ksrc, vsrc = args[K_SRC:V_SRC], args[V_SRC:REST]
    assert vsrc[0] is None and vsrc[7] == CAP // 32 and vsrc[8] is None  # identity table over flat 2:4 V
    if balanced:  # dense K: every row from the tail, from token 0
        assert ksrc[5] is None and ksrc[8] == kd.data_ptr() and ksrc[9:12] == kd.stride()[:3] and ksrc[12] is None
    else:
        assert ksrc[5] == k.values.data_ptr() and ksrc[7] == CAP // 32 and ksrc[8] is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_whole_prompt_goes_to_the_wgmma_kernel_where_there_is_one(lib, dtype):
    L = CAP - 3
    q = torch.randn(B, HQ, L + 5, D, dtype=dtype)[:, :, :L]  # strided: head stride (L + 5) * D
    k, v = _pk(dtype)
    lib.wgmma = True
    out, lse = ops.prefill(lib, q, k, v, scale=-0.25)
    assert out.shape == q.shape and lse.shape == (B, HQ, L)
    (symbol, args), = lib.calls
    assert symbol == "hsg_prefill_sm90a"
    _assert_matches_signature("prefill_wgmma", "", args)
    assert args[:4] == (q.data_ptr(), *q.stride()[:3])
    assert args[4:8] == (k.values.data_ptr(), k.meta.data_ptr(), v.values.data_ptr(), v.meta.data_ptr())
    assert args[8:14] == (CAP, B, HQ, HKV, L, -0.25)
    # not a whole prompt (queries at the end of the keys), explicit lengths, or no such kernel: warp-level
    lib.calls.clear()
    ops.prefill(lib, q[:, :, 1:], k, v)
    ops.prefill(lib, q, k, v, torch.tensor([L, L], dtype=torch.int32))
    lib.wgmma = False
    ops.prefill(lib, q, k, v)
    assert [c[0] for c in lib.calls] == ["hsg_prefill"] * 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_whole_prompt_with_dense_k_goes_to_the_balanced_wgmma_kernel(lib, dtype):
    L = CAP - 3
    q = torch.randn(B, HQ, L, D, dtype=dtype)
    # K longer than the prompt (V's length decides), strided: head stride (L + 7) * D, offset 2 rows
    kd = torch.randn(B, HKV, L + 7, D, dtype=dtype)[:, :, 2:]
    _, v = _pk(dtype)
    lib.wgmma = True
    out, lse = ops.prefill(lib, q, kd, v, scale=0.5)
    assert out.shape == q.shape and lse.shape == (B, HQ, L)
    (symbol, args), = lib.calls
    assert symbol == "hsg_prefill_sm90a_kd"
    _assert_matches_signature("prefill_wgmma_balanced", "", args)
    assert args[:4] == (q.data_ptr(), *q.stride()[:3])
    assert args[4:9] == (kd.data_ptr(), *kd.stride()[:3], L)  # the prompt's rows: zeros past them
    assert args[9:17] == (v.values.data_ptr(), v.meta.data_ptr(), CAP, B, HQ, HKV, L, 0.5)
    # K with channels not contiguous, a token stride that is not a multiple of 8, or a zero stride (expanded):
    # the prompt's rows copied for the tensor map
    lib.calls.clear()
    for k_odd in (kd.transpose(2, 3).contiguous().transpose(2, 3), torch.randn(B, HKV, L, D + 4, dtype=dtype)[..., :D],
                  torch.randn(1, HKV, L, D, dtype=dtype).expand(B, -1, -1, -1)):
        ops.prefill(lib, q, k_odd, v)
        (_, args), = lib.calls
        assert args[4] != k_odd.data_ptr() and args[5:9] == (HKV * L * D, L * D, D, L)
        lib.calls.clear()
    # a driver without cuTensorMapEncodeTiled (the entry point says "not supported"): an error naming it and the fix
    from hierasparse_gen.registry import CudaError

    def unsupported(lib, symbol, device, *args):
        raise CudaError(f"{symbol} failed: operation not supported (cudaError 801)", 801)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base, "launch", unsupported)
        with pytest.raises(CudaError, match=r"no cuTensorMapEncodeTiled .* Fix: update the driver, or pass seqlens"):
            ops.prefill(lib, q, kd, v)
        mp.setattr(base, "launch", lambda *a: (_ for _ in ()).throw(CudaError("other failure", 700)))
        with pytest.raises(CudaError, match=r"^other failure$"):
            ops.prefill(lib, q, kd, v)
    # K on another device than q: refused before any launch
    with pytest.raises(ValueError, match=r"k: on meta but q is on cpu. Fix: keep Q, K and V on one GPU"):
        ops.prefill(lib, q, kd.to("meta"), v)
    assert lib.calls == []
    # queries at the end of the keys, explicit lengths, or no such kernel: the warp-level balanced kernel
    ops.prefill(lib, q[:, :, 1:], kd, v)
    ops.prefill(lib, q, kd, v, torch.tensor([L, L], dtype=torch.int32))
    lib.wgmma = False
    ops.prefill(lib, q, kd, v)
    assert [c[0] for c in lib.calls] == ["hsg_prefill"] * 3


def _packed8(kind, packed, length):
    """A PackedKV of format_fp8's kernel-layout packers: (values, meta, scales) or dense (values, scales)."""
    vals, *meta, scales = packed
    return ops.PackedKV(vals, meta[0] if meta else None, kind, length, scales)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_reads_e4m3_in_the_queries_dtype(lib, dtype):
    """e4m3 PackedKV into prefill: 2:4 K and V reach the 16-bit all-2:4 kernels as 16-bit values under their own
    metadata (widened by the library's kernel: one launch a tensor over its B x H planes; format_fp8's torch
    function where the library has none, holding what unpack gives in q's dtype), dense e4m3 K the balanced ones
    as dense rows of the prompt's length; dense e4m3 V is refused with the fix, before any launch."""
    from hierasparse_gen import format as fmt
    from hierasparse_gen import format_fp8 as f8
    L = CAP - 3
    x = torch.randn(B, HKV, L, D)
    k8 = _packed8("k", f8.pack_k(x, CAP), L)
    v8 = _packed8("v", f8.pack_v(x * 3, CAP), L)
    k16, v16 = ops.as_model_dtype(lib, k8, dtype), ops.as_model_dtype(lib, v8, dtype)
    assert k16.storage == v16.storage == "model" and k16.meta is k8.meta and v16.meta is v8.meta
    assert k16.values.dtype == v16.values.dtype == dtype and k16.values.shape == k8.values.shape
    assert k16.capacity == CAP and k16.length == L
    for (symbol, args), t, t16 in zip(lib.calls, (k8, v8), (k16, v16)):
        assert symbol == f"hsg_compress_widen_{t.kind}8"
        _assert_matches_signature(COMPRESS_E4M3_ABI, f"_widen_{t.kind}8", args)
        assert args == (t.values.data_ptr(), t.meta.data_ptr(), t.scales.data_ptr(), B * HKV, CAP, t16.values.data_ptr())
    lib.calls.clear()
    lib.select = lambda kind, **want: SimpleNamespace(symbol="hsg_compress", abi=COMPRESS_ABI) \
        if kind == "compress" else FakeLib.select(lib, kind, **want)  # no e4m3 tiers: the torch functions
    k16, v16 = ops.as_model_dtype(lib, k8, dtype), ops.as_model_dtype(lib, v8, dtype)
    assert lib.calls == []
    assert torch.equal(fmt.unpack_k(k16.values, k16.meta), f8.unpack_k(k8.values, k8.meta, k8.scales, dtype))
    assert torch.equal(fmt.unpack_v(v16.values, v16.meta), f8.unpack_v(v8.values, v8.meta, v8.scales, dtype))
    kd8 = _packed8("k", f8.pack_k_dense(x, CAP), L)
    kd = ops.as_model_dtype(lib, kd8, dtype)
    assert kd.shape == (B, HKV, L, D) and torch.equal(kd, f8.unpack_k_dense(kd8.values, kd8.scales, dtype)[:, :, :L])
    q = torch.randn(B, HQ, L, D, dtype=dtype)
    del lib.select  # the library's own select again
    lib.wgmma = True
    ops.prefill(lib, q, k8, v8)
    ops.prefill(lib, q, kd8, v8)
    ops.prefill(lib, q, k8, v8, torch.tensor([L, 5], dtype=torch.int32))
    assert [c[0] for c in lib.calls] == ["hsg_compress_widen_v8", "hsg_compress_widen_k8", "hsg_prefill_sm90a",
                                         "hsg_compress_widen_v8", "hsg_prefill_sm90a_kd", "hsg_compress_widen_v8",
                                         "hsg_compress_widen_k8", "hsg_prefill"]
    lib.calls.clear()
    vd8 = _packed8("v", f8.pack_v_dense(x, CAP), L)
    with pytest.raises(ValueError, match=r"v: dense e4m3 V has no prefill kernel .*Fix: compress V with sparse=True"):
        ops.prefill(lib, q, k8, vd8)
    with pytest.raises(ValueError, match=r"q: dtype torch.float32 is not supported. Fix: use torch.float16"):
        ops.prefill(lib, q.float(), k8, v8)
    assert lib.calls == []


def _fake_cache():
    """A HieraCache's tables and pools for the cache ops: 8 blocks a table; K with 3 dense and 2 2:4 slots, V with
    4 and 1; 64-token blocks."""
    from hierasparse_gen.cache import _Tensor

    def tensor(n_dense, n_sparse):
        return _Tensor("k", 0.5, torch.zeros(B, HKV, n_dense, 64, D, dtype=torch.float16),
                       torch.zeros(B, HKV, n_sparse, 64 * D // 2, dtype=torch.float16),
                       torch.zeros(B, HKV, n_sparse, 64 * D // 16, dtype=torch.int16),
                       torch.zeros(B, HKV, 8, dtype=torch.int32))
    return SimpleNamespace(k=tensor(3, 2), v=tensor(4, 1), block=64, max_seq_len=500, head_dim=D)


def test_prefill_cache_op_arguments(lib):
    q = torch.randn(B, HQ, 10, D, dtype=torch.float16)
    cache = _fake_cache()
    tail = torch.randn(B, HKV, 10, D, dtype=torch.float16)
    start = torch.tensor([40, 0], dtype=torch.int32)
    ops.prefill_cache(lib, q, cache, torch.tensor([50, 10], dtype=torch.int32),
                      torch.tensor([10, 10], dtype=torch.int32), k_tail=tail, tail_start=start)
    (symbol, args), = lib.calls
    _assert_matches_signature("prefill", "", args)
    ksrc, vsrc = args[K_SRC:V_SRC], args[V_SRC:REST]
    assert ksrc[:3] == (cache.k.table.data_ptr(), 8, 64) and ksrc[4] == 3 and ksrc[7] == 2
    assert ksrc[8] == tail.data_ptr() and ksrc[12] == start.data_ptr()
    assert vsrc[4] == 4 and vsrc[7] == 1 and vsrc[8] is None and vsrc[12] is None
    assert args[REST + 2] == 500


def test_prefill_cache_on_the_wgmma_table_kernel(lib):
    # Hopper: chunks without tails (compress_then_attend) and whole prompts with dense K rows (balanced) go to the
    # sm_90a table kernel; lengths are passed unless every sequence is the whole prompt
    lib.wgmma = True
    L = 10
    q = torch.randn(B, HQ, L, D, dtype=torch.float16)
    cache = _fake_cache()
    seqlens, qlens = torch.tensor([50, 10], dtype=torch.int32), torch.tensor([10, 7], dtype=torch.int32)
    k = torch.randn(B, HKV, L, D, dtype=torch.float16)
    zero = torch.zeros(B, dtype=torch.int32)
    ops.prefill_cache(lib, q, cache, seqlens, qlens)                                  # a chunk
    ops.prefill_cache(lib, q, cache, seqlens, qlens, whole=True)                      # a whole prompt
    ops.prefill_cache(lib, q, cache, seqlens, qlens, k_tail=k, tail_start=zero, whole=True)  # balanced, whole
    ops.prefill_cache(lib, q, cache, seqlens, qlens, k_tail=k, tail_start=zero)       # balanced chunk: warp-level
    ops.prefill_cache(lib, q, cache, seqlens, qlens, kernel="mma_sp")
    assert [c[0] for c in lib.calls] == ["hsg_prefill_sm90a"] * 3 + ["hsg_prefill"] * 2
    for _, args in lib.calls[:3]:
        _assert_matches_signature("prefill_wgmma_table", "", args)
        assert args[4:7] == (cache.k.table.data_ptr(), cache.v.table.data_ptr(), 8)
        assert args[7:17] == (cache.k.dense.data_ptr(), 3, cache.k.sparse_vals.data_ptr(),
                              cache.k.sparse_meta.data_ptr(), 2, cache.v.dense.data_ptr(), 4,
                              cache.v.sparse_vals.data_ptr(), cache.v.sparse_meta.data_ptr(), 1)
        assert args[23:27] == (B, HQ, HKV, L)
    chunk, whole, balanced = (c[1] for c in lib.calls[:3])
    assert chunk[17:23] == (None, 0, 0, 0, seqlens.data_ptr(), qlens.data_ptr())
    assert whole[17:23] == (None, 0, 0, 0, None, None)
    assert balanced[17:23] == (k.data_ptr(), *k.stride()[:3], None, None)


def test_select_arguments(lib):
    """The select kernel's call: one table (n_sparse2 0, null), or a second one chosen by the same losses."""
    x = torch.randn(B, HKV, 100, D, dtype=torch.float16)
    loss, t1, t2 = torch.zeros(B, HKV, 3), torch.zeros(B, HKV, 4, dtype=torch.int32), torch.zeros(B, HKV, 4, dtype=torch.int32)
    ops.select_blocks(lib, x, loss, 1, 2, 1, 4, t1)
    ops.select_blocks(lib, x, loss, 1, 2, 1, 4, t1, 2, t2)
    (_, one), (_, two) = lib.calls
    for args in (one, two):
        _assert_matches_signature(COMPRESS_ABI, "_select", args)
        assert args[:9] == (loss.data_ptr(), B * HKV, 3, 1, 2, 1, 4, t1.data_ptr(), 4)
    assert one[9:11] == (0, None) and two[9:11] == (2, t2.data_ptr())
    with pytest.raises(InputError, match=r"select_blocks: table2 .* Fix"):
        ops.select_blocks(lib, x, loss, 1, 2, 1, 4, t1, 2, t2[:, :, :3])


def test_compress_and_cache_maintenance_arguments(lib):
    x = torch.randn(B, HKV, 100, D, dtype=torch.float16)
    ops.score_blocks(lib, x, "k", 32)
    ops.select_blocks(lib, x, torch.zeros(B, HKV, 3), 1, 1, 1, 4, torch.zeros(B, HKV, 4, dtype=torch.int32))
    ops.fill_blocks(lib, x, "v", torch.zeros(B, HKV, 4, dtype=torch.int32), 32,
                    torch.zeros(B, HKV, 2, 32, D, dtype=torch.float16), torch.zeros(B, HKV, 2, 32 * D // 2),
                    torch.zeros(B, HKV, 2, 32 * D // 16, dtype=torch.int16))
    (s1, a1), (s2, a2), (s3, a3) = lib.calls
    _assert_matches_signature(COMPRESS_ABI, "_score_k", a1)
    _assert_matches_signature(COMPRESS_ABI, "_select", a2)
    _assert_matches_signature(COMPRESS_ABI, "_fill_v", a3)
    assert s1.endswith("_score_k") and s2.endswith("_select") and s3.endswith("_fill_v")
    # V's token weights: one per token the fill covers (100 tokens in 32-token blocks: 128), float32
    pools = (torch.zeros(B, HKV, 2, 32, D, dtype=torch.float16), torch.zeros(B, HKV, 2, 32 * D // 2),
             torch.zeros(B, HKV, 2, 32 * D // 16, dtype=torch.int16))
    table = torch.zeros(B, HKV, 4, dtype=torch.int32)
    w = torch.ones(B, HKV, 128)
    ops.fill_blocks(lib, x, "v", table, 32, *pools, w)
    assert lib.calls[-1][1][-1] == w.data_ptr()
    for bad in (torch.ones(B, HKV, 100), torch.ones(B, HKV, 128, dtype=torch.float16), torch.ones(B, HKV, D)):
        with pytest.raises(InputError, match=r"fill_blocks: weight .*Fix: pass contiguous float32 \[2, 2, 128\]"):
            ops.fill_blocks(lib, x, "v", table, 32, *pools, bad)


@pytest.mark.parametrize("kind", ["k", "v"])
def test_compress_op_arguments(lib, monkeypatch, kind):
    calls = []

    class Fn:
        def __call__(self, *args):
            calls.append(args)
            return 0
    monkeypatch.setattr(lib, "function", lambda symbol: Fn(), raising=False)
    monkeypatch.setattr(lib, "check", lambda code, what: None, raising=False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    x = torch.randn(B, HKV, 100, D, dtype=torch.float16)[:, :, :, :]
    vals, meta = packing._compress_op(lib.key, x, CAP, kind)
    (args,) = calls
    _assert_matches_signature(COMPRESS_ABI, f"_{kind}", args[:-1])
    assert args[4:8] == (B, HKV, 100, CAP)
    assert vals.shape == ((B, HKV, CAP, D // 2) if kind == "k" else (B, HKV, CAP // 2, D))


def test_misaligned_rows_are_copied_once():
    base = torch.randn(2 * 8 * 100 * 64 + 1, dtype=torch.float16)
    x = base[1:].view(2, 8, 100, 64)           # contiguous, but 2 bytes off a 16-byte boundary
    y = checks.rows16(x)
    assert y.data_ptr() % 16 == 0 and torch.equal(x, y)
    strided = torch.randn(2, 8, 100, 70, dtype=torch.float16)[..., :64]  # row stride 70: not 16-byte rows
    assert checks.rows16(strided).stride(2) == 64
    aligned = torch.randn(2, 8, 100, 64, dtype=torch.float16)
    assert checks.rows16(aligned) is aligned


def test_prefill_refuses_bad_inputs_before_any_call(lib):
    q = torch.randn(B, HQ, 10, D, dtype=torch.float16)
    k, v = _pk()
    with pytest.raises(ValueError, match=r"k: dense K of shape \(2, 2, 50, 32\) and dtype torch.float16 does not "
                                         r"match V .*Fix: pass K as \[batch, kv_heads, tokens, head_dim\]"):
        ops.prefill(lib, q, torch.randn(B, HKV, 50, D // 2, dtype=torch.float16), v)
    with pytest.raises(ValueError, match=r"qlens: expected an int32 tensor of shape \(2,\)"):
        ops.prefill(lib, q, k, v, qlens=torch.tensor([10, 3]))
    with pytest.raises(ValueError, match=r"q: shape \(2, 8, 10, 32\) does not fit the keys"):
        ops.prefill(lib, q[..., :32], k, v)
    with pytest.raises(ValueError, match="expected the PackedKV returned by compress_v"):
        ops.prefill(lib, q, k, k)
    assert lib.calls == []


def test_cache_append_arguments(lib):
    k = torch.randn(B, HKV, D, dtype=torch.float16)
    table, dense, vals, meta = _cache_pools()
    seqlens = torch.tensor([100, 7], dtype=torch.int32)
    ctrl = torch.zeros(B, 6 + 3 + 3, dtype=torch.int32)
    weight = torch.rand(B, HKV, D)
    v_weight, mass = torch.rand(B, HKV, 4 * 64), torch.rand(B, HKV, 4)
    for k_weight in (None, weight):
        lib.calls.clear()
        cache_kernels._cache_append_impl(lib.key, k, k, seqlens, ctrl, table, dense, vals, meta, table, dense, vals,
                                         meta, 64, 1, 4, 256, 0.5, 1.0, k_weight, v_weight, mass)
        (symbol, args), = lib.calls
        assert symbol == "hsg_compress_append"
        _assert_matches_signature(COMPRESS_ABI, "_append", args)
        assert args[8:16] == (12, B, HKV, 4, 64, 1, 4, 256)  # ctrl width, batch, heads, table, block, sink, window, cap
        assert args[20:23] == (3, 2, 0.5) and args[27:30] == (3, 2, 1.0)  # dense/2:4 slots and ratio, K then V
        assert args[30] == (None if k_weight is None else weight.data_ptr())  # K's channel weights
        # V's token weights and the blocks' masses (re-tiering)
        assert args[31:33] == (v_weight.data_ptr(), mass.data_ptr())


def test_fill_ops_refuse_host_tensors():
    """The fill's ops are public: a CPU tensor is refused by name before anything reaches a kernel."""
    k = torch.randn(1, 2, 64, D, dtype=torch.float16)
    with pytest.raises(InputError, match=r"tokens: tensor is on cpu.*Fix"):
        ops.mass_stats(None, k, torch.rand(1, 2, 64), 16, 32)
    with pytest.raises(InputError, match=r"q_obs: tensor is on cpu.*Fix"):
        ops.channel_weights(None, torch.randn(1, 4, 16, D, dtype=torch.float16), 2)


def test_mass_stats_arguments(lib):
    """The stats kernel's call: the masses, rows, length, window, block, the block sums it returns, and the rows of
    the cache's tensors it writes (pointer and row stride), or nulls."""
    k = torch.randn(B, HKV, 100, D, dtype=torch.float16)
    tokens = torch.rand(B, HKV, 100)
    seen, weights = torch.zeros(B, HKV, 9), torch.zeros(B, HKV, 128)
    sums, s, w = ops.mass_stats(lib, k, tokens, 16, 32, seen=seen[:, :, :5], weights=weights)
    (symbol, args), = lib.calls
    assert symbol == "hsg_compress_mass_stats" and s is not None and w is weights
    _assert_matches_signature(COMPRESS_ABI, "_mass_stats", args)
    assert args[:5] == (tokens.data_ptr(), B * HKV, 100, 16, 32) and args[5] == sums.data_ptr()
    assert args[6:10] == (seen.data_ptr(), 9, weights.data_ptr(), 128) and sums.shape == (B, HKV, 3)
    lib.calls.clear()
    ops.mass_stats(lib, k, tokens, 16, 32)
    (_, args), = lib.calls
    assert args[6:10] == (None, 0, None, 0)
    with pytest.raises(InputError, match=r"mass_stats: tokens .* Fix"):
        ops.mass_stats(lib, k, tokens.double(), 16, 32)
    with pytest.raises(InputError, match=r"mass_stats: weights .* Fix: pass float32"):
        ops.mass_stats(lib, k, tokens, 16, 32, weights=weights[:, :, :99])


def test_channel_weights_arguments(lib):
    """K's channel-weight kernel: the window's strides (a view of the prompt), the shape, the output; bad input
    refused with its fix."""
    q = torch.randn(B, HQ, 100, D, dtype=torch.float16)
    w = ops.channel_weights(lib, q[:, :, -16:], HKV)
    (symbol, args), = lib.calls
    assert symbol == "hsg_compress_channel_weights"
    _assert_matches_signature(COMPRESS_ABI, "_channel_weights", args)
    assert args[1:4] == q.stride()[:3] and args[4:8] == (B, HKV, HQ // HKV, 16) and args[8] == w.data_ptr()
    assert w.shape == (B, HKV, D) and w.dtype == torch.float32
    with pytest.raises(InputError, match=r"channel_weights: q_obs .* Fix: pass the window's queries"):
        ops.channel_weights(lib, q[:, :, -16:].float(), HKV)
    with pytest.raises(InputError, match=r"channel_weights: out .* Fix: pass a contiguous float32"):
        ops.channel_weights(lib, q[:, :, -16:], HKV, out=torch.empty(B, HKV, D + 1))


def test_token_mass_arguments(lib):
    """The scoring kernel's call: the window's strides (a view of the prompt's queries), K's, the shape, the scale,
    a workspace of at least the kernel's size for any range width (64-key ranges bound it), the output."""
    q = torch.randn(B, HQ, 100, D, dtype=torch.float16)
    k = torch.randn(B, HKV, 100, D, dtype=torch.float16)
    mass = ops.token_mass(lib, q[:, :, -16:], k, None)
    (symbol, args), = lib.calls
    assert symbol == "hsg_compress_token_mass"
    _assert_matches_signature(COMPRESS_ABI, "_token_mass", args)
    assert args[1:4] == q.stride()[:3] and args[5:8] == k.stride()[:3]
    assert args[8:13] == (B, HKV, HQ // HKV, 16, 100) and args[13] == pytest.approx(D ** -0.5)
    rows, ranges = HQ // HKV * 16, -(-100 // 64)
    assert args[14:18] == (None, 0, 0, 0)  # no log-sum-exp: the kernel's first pass computes it
    assert args[19] >= B * HKV * rows * (ranges * 8 + 4) and args[20] == mass.data_ptr()
    assert mass.shape == (B, HKV, 100) and mass.dtype == torch.float32
    # the queries' log-sum-exp given (a view of the prompt's [B, Hq, L]): its pointer and strides, no workspace
    lse = torch.randn(B, HQ, 100)
    lib.calls.clear()
    mass = ops.token_mass(lib, q[:, :, -16:], k, None, lse[:, :, -16:])
    (symbol, args), = lib.calls
    _assert_matches_signature(COMPRESS_ABI, "_token_mass", args)
    assert args[14] == lse[:, :, -16:].data_ptr() and args[15:18] == lse.stride()
    assert args[18] is None and args[19] == 0 and args[20] == mass.data_ptr()
    for bad in (lse[:, :, -16:].half(), lse[:, :, -8:], lse[:, :1, -16:]):
        with pytest.raises(InputError, match=r"token_mass: lse .* Fix: pass the queries' log-sum-exp as float32"):
            ops.token_mass(lib, q[:, :, -16:], k, None, bad)
    with pytest.raises(InputError, match=r"token_mass: q_obs .* Fix: pass each sequence's last W <= L queries"):
        ops.token_mass(lib, q[:, :, -16:].float(), k, None)
    with pytest.raises(InputError, match=r"token_mass: q_obs .* Fix"):  # one sequence's queries, two's keys
        ops.token_mass(lib, q[:1, :, -16:], k, None)
