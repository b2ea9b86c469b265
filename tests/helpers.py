"""Shared GPU-test helpers: fresh random inputs and the error yardstick against the reference."""

import torch

from hierasparse_gen.reference import decode_reference


def rand(*shape, seed, dtype=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


def lowp_reference(q, k, v, seqlens):
    """The same attention in the inputs' precision (torch math path): the error yardstick."""
    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(Hq // Hkv, 1)
    vv = v.repeat_interleave(Hq // Hkv, 1)
    mask = torch.arange(L, device=q.device).view(1, 1, 1, L) < seqlens.to(q.device).view(B, 1, 1, 1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=mask)
    return out.squeeze(2)


def check_against_reference(out, lse, q, k, v, seqlens) -> float:
    """Kernel output within 4x the same-precision torch error of the float64 reference."""
    ref, ref_lse = decode_reference(q, k, v, seqlens)
    lowp = lowp_reference(q, k, v, seqlens)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    assert not out.isnan().any(), "unwritten or NaN output"
    err = (out.double() - ref).abs().max().item()
    err_lowp = (lowp.double() - ref).abs().max().item()
    assert err <= 4 * err_lowp + 1e-4, f"max error {err:.3g} vs same-precision torch {err_lowp:.3g}"
    assert torch.allclose(lse.double(), ref_lse, atol=2e-3, rtol=1e-4), (lse.double() - ref_lse).abs().max().item()
    return err
