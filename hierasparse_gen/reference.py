"""Float64 reference attention, for tests and benchmarks (never used by the kernels)."""

from __future__ import annotations

import math

import torch


def decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens=None,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query per sequence, in float64.

    q ``[B, Hq, D]``; k, v ``[B, Hkv, L, D]`` (dense, already pruned as the cache holds them);
    seqlens ``[B]`` keys attended per sequence (default L). Query head ``h`` reads KV head
    ``h // (Hq // Hkv)``. Returns (out ``[B, Hq, D]`` float64, lse ``[B, Hq]`` float64, natural
    log); a sequence of length 0 gives zeros and -inf.
    """
    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd = q.double().view(B, Hkv, group, D)
    s = torch.einsum("bhgd,bhld->bhgl", qd, k.double()) * scale
    lens = torch.full((B,), L) if seqlens is None else seqlens.detach().long().cpu()
    mask = torch.arange(L).view(1, L) >= lens.view(B, 1)
    s = s.masked_fill(mask.view(B, 1, 1, L).to(s.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    # values past a sequence's length must not leak in, even as NaN (0 * NaN = NaN)
    vd = v.double().masked_fill(mask.view(B, 1, L, 1).to(v.device), 0.0)
    out = torch.einsum("bhgl,bhld->bhgd", p, vd)
    return out.reshape(B, Hq, D), lse.reshape(B, Hq)


def prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens=None,
                      scale: float | None = None, qlens=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``q [B, Hq, Lq, D]`` in float64: sequence b has ``qlens[b]`` queries
    (default Lq; rows past it give zeros and -inf), the last of its ``seqlens[b]`` tokens.

    Query i of sequence b sits at position seqlens[b] - qlens[b] + i and attends to keys
    0..that position (none if it is negative: zeros and -inf). Returns (out, lse).
    """
    B, Hq, Lq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    lens = torch.full((B,), L) if seqlens is None else seqlens.detach().long().cpu()
    n = torch.full((B,), Lq) if qlens is None else qlens.detach().long().cpu().clamp(0, Lq)
    s = torch.einsum("bhgqd,bhld->bhgql", q.double().view(B, Hkv, group, Lq, D), k.double()) * scale
    rows = torch.arange(Lq).view(1, Lq)
    pos = lens.view(B, 1) - n.view(B, 1) + rows                                # [B, Lq]
    keys = torch.arange(L).view(1, 1, L)
    mask = (keys > pos.unsqueeze(-1)) | (keys >= lens.view(B, 1, 1)) | (rows >= n.view(B, 1)).unsqueeze(-1)
    s = s.masked_fill(mask.view(B, 1, 1, Lq, L).to(s.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    vd = v.double().masked_fill((torch.arange(L).view(1, L) >= lens.view(B, 1)).view(B, 1, L, 1).to(v.device), 0.0)
    out = torch.einsum("bhgql,bhld->bhgqd", p, vd)
    return out.reshape(B, Hq, Lq, D), lse.reshape(B, Hq, Lq)
