"""Shared GPU-test helpers: fresh random inputs, the error yardsticks against the float64
reference (decode and prefill), and one checked cache prefill chunk."""

import torch

from hierasparse_gen.reference import decode_reference, prefill_reference


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


def _lowp(q, k, v, seqlens, qlens=None):
    """Same-precision yardstick: the torch math path on the same (pruned) K/V."""
    B, Hq, Lq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    n = torch.full((B,), Lq, device=q.device) if qlens is None else qlens.to(q.device).long()
    rows = torch.arange(Lq, device=q.device).view(1, Lq, 1)
    pos = seqlens.view(B, 1, 1) - n.view(B, 1, 1) + rows
    keys = torch.arange(L, device=q.device).view(1, 1, L)
    mask = (keys <= pos) & (keys < seqlens.view(B, 1, 1)) & (rows < n.view(B, 1, 1))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1), attn_mask=mask.unsqueeze(1))
    return out.nan_to_num(0.0)


def check_prefill(out, lse, q, k, v, seqlens, qlens=None, scale=None):
    """Kernel output within 4x the same-precision torch error of the float64 reference; lse
    finite exactly where the reference's is, and close there."""
    ref, ref_lse = prefill_reference(q, k, v, seqlens, scale=scale, qlens=qlens)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert not out.isnan().any(), "unwritten or NaN output"
    err = (out.double() - ref).abs().max().item()
    if scale is None:
        err_lowp = (_lowp(q, k, v, seqlens, qlens).double() - ref).abs().max().item()
        assert err <= 4 * err_lowp + 1e-4, f"max error {err:.3g} vs same-precision torch {err_lowp:.3g}"
    else:
        assert err <= 2e-2, f"max error {err:.3g}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite.to(lse.device))
    assert torch.allclose(lse.double()[finite], ref_lse[finite], atol=2e-3, rtol=1e-4)
    return err


def cache_chunk(cache, mode, q, k, v, lengths):
    """Prefill one chunk in `mode`; check it against the reference over the keys the mode
    promises: the stored cache (compress_then_attend), the dense chunk after the cache as it
    was (attend_then_compress), or stored V with dense chunk keys (balanced)."""
    before_k, before_v = cache.to_dense()
    old = list(cache.lengths)
    out, lse = cache.prefill(k, v, lengths, q=q, mode=mode)
    after_k, after_v = cache.to_dense()
    B, Hkv, _, D = k.shape
    total = [o + n for o, n in zip(old, lengths)]
    assert cache.lengths == total
    L = max(total)
    kref = torch.zeros(B, Hkv, L, D, dtype=k.dtype, device="cuda")
    vref = torch.zeros_like(kref)
    for b in range(B):
        o, n = old[b], lengths[b]
        if mode == "compress_then_attend":
            kref[b, :, :o + n], vref[b, :, :o + n] = after_k[b, :, :o + n], after_v[b, :, :o + n]
        elif mode == "attend_then_compress":
            kref[b, :, :o], vref[b, :, :o] = before_k[b, :, :o], before_v[b, :, :o]
            kref[b, :, o:o + n], vref[b, :, o:o + n] = k[b, :, :n], v[b, :, :n]
        else:  # balanced: keys from the last 32-token boundary before the chunk are dense
            s = o - o % 32
            kref[b, :, :s] = after_k[b, :, :s]
            kref[b, :, s:o] = before_k[b, :, s:o]
            kref[b, :, o:o + n] = k[b, :, :n]
            vref[b, :, :o + n] = after_v[b, :, :o + n]
    seqlens = torch.tensor(total, dtype=torch.int32, device="cuda")
    qlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    check_prefill(out, lse, q, kref, vref, seqlens, qlens)
    return out


def kernel_masses(monkeypatch, lib) -> None:
    """SimulatedCache reads the attention masses of ``lib``'s scoring kernel, their block sums and weights from its
    stats kernel and K's channel weights from its kernel, as HieraCache does. Two roundings of one float32 sum (the
    kernel's and torch's) may order near-equal blocks or weights differently; the cache-equals-simulation tests
    check selection and packing given the masses, and test_gpu_selection.py checks the kernels against float64 and
    torch. enable()'s fresh prompts hand the scoring kernel cuDNN's log-sum-exp, which gives the same masses to
    float32 rounding only: here its attention returns none, so both score by the kernel's two passes
    (test_gpu_hf.py checks that lse, test_gpu_selection.py the masses from a given one)."""
    import hierasparse_gen.simulate as simulate
    from hierasparse_gen import hf, ops
    monkeypatch.setattr(hf, "_dense_causal_lse", lambda q, k, v, scale: (hf._dense_causal(q, k, v, scale), None))
    keys = {}  # the keys of the last scoring: they name the stats kernel's variant (head_dim, dtype)

    def mass(q_obs, k, scale):
        keys["k"] = k[None, :, :1]
        return ops.token_mass(lib, q_obs[None], k[None], scale)[0]

    def stats(tokens, W, block):
        H, n = tokens.shape
        seen = torch.empty(1, H, n // block, device=tokens.device)
        weights = torch.empty(1, H, n, device=tokens.device)
        sums, _, _ = ops.mass_stats(lib, keys["k"], tokens[None].contiguous(), W, block, seen=seen, weights=weights)
        return sums[0], seen[0], weights[0]
    monkeypatch.setattr(simulate, "token_mass", mass)
    monkeypatch.setattr(simulate, "mass_stats", stats)
    monkeypatch.setattr(simulate, "channel_weights", lambda q_obs, heads: ops.channel_weights(lib, q_obs[None], heads)[0])
