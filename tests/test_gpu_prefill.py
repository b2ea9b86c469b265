"""GPU tests of the all-2:4 causal prefill kernel against the float64 reference on the same
pruned K/V; chunked prefill equals single-shot prefill (the paper code's chunk-offset bug)."""

import pytest
import torch

import hierasparse_gen
from hierasparse_gen import format as fmt
from hierasparse_gen.reference import prefill_reference
from helpers import rand

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def lib(llama3_build):
    return hierasparse_gen.load(llama3_build)


def _lowp(q, k, v, seqlens):
    """Same-precision yardstick: the torch math path on the same (pruned) K/V."""
    B, Hq, Lq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    pos = seqlens.view(B, 1, 1) - Lq + torch.arange(Lq, device=q.device).view(1, Lq, 1)
    keys = torch.arange(L, device=q.device).view(1, 1, L)
    mask = (keys <= pos) & (keys < seqlens.view(B, 1, 1))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1), attn_mask=mask.unsqueeze(1))
    return out.nan_to_num(0.0)


def _check(lib, B, Lq, lengths, dtype, seed, L=None, hq=32, hkv=8, d=128):
    L = L or max(lengths)
    k = rand(B, hkv, L, d, seed=seed, dtype=dtype)
    v = rand(B, hkv, L, d, seed=seed + 1, dtype=dtype)
    q = rand(B, hq, Lq, d, seed=seed + 2, dtype=dtype)
    kc, vc = lib.compress_k(k), lib.compress_v(v)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out, lse = lib.prefill(q, kc, vc, seqlens)
    kp, vp = fmt.unpack_k(kc.values, kc.meta), fmt.unpack_v(vc.values, vc.meta)
    ref, ref_lse = prefill_reference(q, kp, vp, seqlens)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert not out.isnan().any()
    err = (out.double() - ref).abs().max().item()
    err_lowp = (_lowp(q, kp, vp, seqlens).double() - ref).abs().max().item()
    assert err <= 4 * err_lowp + 1e-4, f"max error {err:.3g} vs same-precision torch {err_lowp:.3g}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite.to(lse.device))
    assert torch.allclose(lse.double()[finite], ref_lse[finite], atol=2e-3, rtol=1e-4)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Lq,lengths", [
    (1, 1, [1]), (1, 17, [17]), (1, 64, [64]), (1, 65, [65]), (2, 100, [100, 300]), (3, 300, [300, 1000, 333]),
    (2, 40, [20, 2000]),  # sequence 0 has fewer keys than queries: its first queries see nothing
    (1, 1000, [1000]), (2, 333, [4097, 700]),
])
def test_prefill_matches_reference(lib, poison, dtype, B, Lq, lengths):
    _check(lib, B, Lq, lengths, dtype, seed=B * 1000 + Lq)


@pytest.fixture(scope="module")
def matrix(matrix_build):
    return hierasparse_gen.load(matrix_build)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,Hq,Hkv", [(64, 4, 4), (96, 10, 2), (128, 32, 8), (256, 16, 1)])
def test_prefill_shapes(matrix, poison, dtype, D, Hq, Hkv):
    # groups 1, 5, 4 and 16 (16: two CTAs of 8 heads each per KV head)
    _check(matrix, 2, 150, [150, 700], dtype, seed=D + Hq, hq=Hq, hkv=Hkv, d=D)


def test_prefill_long(lib, poison):
    _check(lib, 1, 2048, [16384], torch.float16, seed=5)
    _check(lib, 1, 4096, [4096], torch.bfloat16, seed=6)


def test_chunked_prefill_equals_single_shot(lib, poison):
    L, chunk = 900, 300
    k = rand(2, 8, L, 128, seed=9)
    q = rand(2, 32, L, 128, seed=10)
    kc, vc = lib.compress_k(k), lib.compress_v(k)
    full, full_lse = lib.prefill(q, kc, vc, torch.tensor([L, L], dtype=torch.int32, device="cuda"))
    for off in range(0, L, chunk):
        part, part_lse = lib.prefill(q[:, :, off:off + chunk], kc, vc,
                                     torch.tensor([off + chunk] * 2, dtype=torch.int32, device="cuda"))
        # a chunk at offset `off` attends to everything before it and causally to itself
        assert torch.allclose(part.float(), full[:, :, off:off + chunk].float(), atol=2e-3, rtol=0)
        assert torch.allclose(part_lse, full_lse[:, :, off:off + chunk], atol=1e-4)
