"""GPU tests of the e4m3 (float8_e4m3) decode tiers: the flat decode kernel with K and V 2:4 in e4m3, V alone
in e4m3, both dense in e4m3 (the FP8 cache engines ship) and dense e4m3 K with 2:4 e4m3 V, per-token scales, against the float64 reference on exactly the stored values (format_fp8's
bytes, dequantized in float32: exact). Fresh random inputs with outlier tokens and channels, outputs poisoned.
Generality: head_dim 64..256, groups 1..16, fp16 and bf16 (tests/specs/gpu_fp8.yaml)."""

import pytest
import torch

from hierasparse_gen import format as fmt
from hierasparse_gen import format_fp8 as f8
from hierasparse_gen.errors import DispatchError, InputError
from hierasparse_gen.reference import decode_reference
from helpers import lowp_reference, rand

pytestmark = pytest.mark.gpu

SHAPES = [(64, 9, 3), (96, 4, 4), (128, 32, 8), (256, 16, 1)]  # (head_dim, query heads, KV heads)


def _kv(B, H, L, D, dtype, seed):
    """Random K/V whose tokens and channels differ in scale by 100x (what per-token scales are for)."""
    x = rand(B, H, L, D, dtype=torch.float32, seed=seed)
    token = torch.exp(rand(B, H, L, 1, dtype=torch.float32, seed=seed + 1) * 1.5)
    channel = torch.ones(D, device="cuda")
    channel[::13] = 8.0
    return (x * token * channel).to(dtype)


#: (K storage, K 2:4, V 2:4): the tiers of tests/specs/gpu_fp8.yaml (V is always e4m3)
TIERS = [("float8_e4m3", True, True), ("model", True, True), ("float8_e4m3", False, False),
         ("float8_e4m3", False, True)]


def _held(t):
    """Exactly what a packed tensor holds, in float32 (e4m3 code x float16 scale is exact there)."""
    if t.scales is None:
        return (fmt.unpack_k if t.kind == "k" else fmt.unpack_v)(t.values, t.meta).float()
    if not t.sparse:
        return (f8.unpack_k_dense if t.kind == "k" else f8.unpack_v_dense)(t.values, t.scales)
    return (f8.unpack_k if t.kind == "k" else f8.unpack_v)(t.values, t.meta, t.scales)


def _check(lib, B, Hq, Hkv, D, lengths, dtype, seed, tier=TIERS[0], num_splits=None):
    L = max(lengths)
    k, v = _kv(B, Hkv, L, D, dtype, seed), _kv(B, Hkv, L, D, dtype, seed + 5)
    q = rand(B, Hq, D, dtype=dtype, seed=seed + 9)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    k_storage, k_sparse, v_sparse = tier
    kc = lib.compress_k(k, storage=k_storage, sparse=k_sparse)
    vc = lib.compress_v(v, storage="float8_e4m3", sparse=v_sparse)
    out, lse = lib.decode(q, kc, vc, seqlens, num_splits=num_splits)
    torch.cuda.synchronize()
    kx, vx = _held(kc), _held(vc)
    ref, ref_lse = decode_reference(q, kx, vx, seqlens)
    lowp = lowp_reference(q, kx.to(dtype), vx.to(dtype), seqlens).nan_to_num(0.0)
    assert out.shape == q.shape and not out.isnan().any(), "unwritten or NaN output"
    err = (out.double() - ref).abs().max().item()
    err_lowp = (lowp.double() - ref).abs().max().item()
    assert err <= 4 * err_lowp + 1e-4, f"max error {err:.3g} vs same-precision torch {err_lowp:.3g}"
    assert torch.allclose(lse.double(), ref_lse, atol=2e-3, rtol=1e-4), (lse.double() - ref_lse).abs().max().item()
    return kc, vc


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tier", TIERS, ids=["k24f8_v24f8", "k24_v24f8", "kdf8_vdf8", "kdf8_v24f8"])
def test_decode_e4m3(fp8, poison, dtype, shape, tier):
    D, Hq, Hkv = shape
    _check(fp8, 4, Hq, Hkv, D, [1, 95, 1000, 3001], dtype, seed=D + Hq, tier=tier)


@pytest.mark.parametrize("splits", [1, 3, 64])
@pytest.mark.parametrize("tier", [TIERS[0], TIERS[2]], ids=["k24f8_v24f8", "kdf8_vdf8"])
def test_decode_e4m3_splits_and_long(fp8, poison, splits, tier):
    _check(fp8, 2, 32, 8, 128, [20000, 33], torch.float16, seed=splits, tier=tier, num_splits=splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_packers_are_bit_exact(fp8, poison, dtype, shape):
    """The e4m3 packing kernels (2:4 and dense, K and V) write format_fp8's bytes: values, metadata, scales; with
    outlier tokens and channels, all-zero tokens, a length that is not a whole chunk and a strided input."""
    D, _, H = shape
    big = _kv(3, 2 * H, 300, D + 32, dtype, D)
    x = big[:, ::2, :, 16:16 + D]  # head stride, token stride D + 32, an offset start
    x[0, :, 7] = 0  # an all-zero token: scale 1
    x[1, 0, 40:44] *= 1e-4  # a group of small tokens
    for kind in "kv":
        for sparse in (True, False):
            got = (fp8.compress_k if kind == "k" else fp8.compress_v)(x, storage="float8_e4m3", sparse=sparse)
            want = {(True, "k"): f8.pack_k, (True, "v"): f8.pack_v, (False, "k"): f8.pack_k_dense,
                    (False, "v"): f8.pack_v_dense}[(sparse, kind)](x.cpu())
            for a, b, name in zip((got.values, got.meta, got.scales) if sparse else (got.values, got.scales), want,
                                  ("values", "meta", "scales") if sparse else ("values", "scales")):
                assert torch.equal(a.cpu(), b), (kind, sparse, name, int((a.cpu() != b).sum()))


def test_packed_sizes(fp8, poison):
    k = _kv(2, 8, 300, 128, torch.bfloat16, 3)
    kc = fp8.compress_k(k, storage="float8_e4m3")
    # 2:4 e4m3 is 5/16 of the fp16 bytes plus the scales
    assert kc.nbytes() == 2 * 8 * 320 * (64 + 16 + 2)
    kd = fp8.compress_k(k, storage="float8_e4m3", sparse=False)
    want = f8.pack_k_dense(k.cpu())
    assert kd.meta is None and torch.equal(kd.values.cpu(), want[0]) and torch.equal(kd.scales.cpu(), want[1])
    assert kd.nbytes() == 2 * 8 * 320 * (128 + 2) and kd.capacity == 320 and kd.head_dim == 128


def test_errors(fp8):
    k = _kv(1, 8, 64, 128, torch.float16, 4)
    q = rand(1, 32, 128, dtype=torch.float16, seed=5)
    kc, vc = fp8.compress_k(k), fp8.compress_v(k)  # model dtype: no such tier in this build
    with pytest.raises(DispatchError, match="k_storage=model, v_storage=model|k=sparse24, v=sparse24"):
        fp8.decode(q, kc, vc)
    v8 = fp8.compress_v(k, storage="float8_e4m3")
    k8 = fp8.compress_k(k, storage="float8_e4m3")
    with pytest.raises(InputError, match="storage 'e4m3' is not a storage"):
        fp8.compress_k(k, storage="e4m3")
    bad = type(v8)(v8.values, v8.meta, "v", v8.length, v8.scales.float())
    with pytest.raises(InputError, match="v.scales.*Fix: pass the contiguous float16"):
        fp8.decode(q, k8, bad)
    with pytest.raises(InputError, match="sparse=False with the model dtype.*Fix: pass storage='float8_e4m3'"):
        fp8.compress_k(k, sparse=False)
    inf = k.clone()
    inf[0, 0, 3, 5] = float("inf")
    with pytest.raises(InputError, match="inf or NaN"):
        fp8.compress_k(inf, storage="float8_e4m3")


def test_torch_packer_where_the_library_has_none(llama3, poison):
    """A library built without e4m3 tiers has no e4m3 packers: compress_k/v(storage="float8_e4m3") falls back to
    format_fp8's torch functions on the GPU, which write the same bytes."""
    k = _kv(2, 8, 200, 128, torch.float16, 6)
    for kind in "kv":
        for sparse in (True, False):
            got = (llama3.compress_k if kind == "k" else llama3.compress_v)(k, storage="float8_e4m3", sparse=sparse)
            want = {(True, "k"): f8.pack_k, (True, "v"): f8.pack_v, (False, "k"): f8.pack_k_dense,
                    (False, "v"): f8.pack_v_dense}[(sparse, kind)](k.cpu())
            for a, b in zip((got.values, got.meta, got.scales) if sparse else (got.values, got.scales), want):
                assert torch.equal(a.cpu(), b)
