"""The 2:4 KV-cache format: magnitude pruning, packing and unpacking, in torch (CPU or GPU).

Everything about the byte layout that the kernels read lives in this file.

Element level
-------------
In every group of 4 consecutive elements along the reduction axis of a GEMM the 2 of
largest magnitude are kept (ties go to the lower index, so packing is deterministic and
the GPU compressor is bit-identical to this module). A group stores its 2 kept values in
order and a 4-bit nibble ``i0 | i1 << 2`` (``i0 < i1``); the nibbles of 4 consecutive
groups (16 dense elements) form one 16-bit metadata word, group ``j`` in bits
``[4j, 4j+4)``. This is the nibble encoding of CUTLASS's SM80 sparse format (and of
``torch.sparse._semi_structured_conversions``) before CUTLASS's reordering.

* K is 2:4 along head_dim, per token (the A operand of ``S^T = K·Q^T``).
* V is 2:4 along the sequence, per channel: groups of 4 consecutive tokens (the A operand
  of ``O^T = V^T·P^T``).

Logical layout (``*_logical`` helpers)
---------------------------------------
* K values ``[B, H, L, D/2]``, K words ``[B, H, L, D/16]``.
* V values ``[B, H, D, L/2]``, V words ``[B, H, D, L/16]`` (rows are channels of V^T).

Kernel ("fragment") layout: what the cache stores
-------------------------------------------------
The kernels use ``mma.sp.m16n8k32``: a 16-row x 32-column A tile, stored as 16 x 16 kept
values plus one 32-bit metadata register per thread. The cache stores every tile in the
order of the A fragment, so lane ``l`` of a warp loads its whole fragment with one 16-byte
load. With ``g = l // 4``, ``q = l % 4``, fragment element ``e`` (0..7) of lane ``l`` is
row ``g + 8*((e >> 1) & 1)``, kept column ``2q + (e & 1) + 8*(e >> 2)`` of the tile.
The metadata register of lane ``(g, q)``, ``q`` in {0, 1}, holds the word of row ``g``
(low 16 bits) and of row ``g + 8`` (high 16 bits) covering dense columns
``[16q, 16q + 16)`` of the tile (lanes with ``q`` in {2, 3} supply none: selector 0).

* K, per (batch, head), per 16-token tile ``T`` (tile rows are tokens, columns head_dim):
  values ``[T, KS, g, q, e]`` with ``KS = D/32`` k-steps; metadata ``[T, g, q, KS]`` as
  32-bit registers.
* V, per (batch, head), per 32-token chunk ``C`` (tile rows are channels, columns tokens):
  values ``[C, MT, g, q, e]`` with ``MT = D/16`` channel tiles; metadata
  ``[C, g, q, MT]`` as 32-bit registers.

The stored tensors keep the byte counts of the logical ones and are exposed with the shapes
K values ``[B, H, cap, D/2]``, K meta ``[B, H, cap, D/16]`` (int16), V values
``[B, H, cap/2, D]``, V meta ``[B, H, cap/16, D]`` (int16); ``cap`` (the token capacity) is
a multiple of :data:`CHUNK`. Tokens past the compressed length are stored as zeros.
"""

from __future__ import annotations

import torch

#: Tokens per V chunk (one k-step of ``O^T = V^T·P^T``); capacities are multiples of it.
CHUNK = 32
#: Dense elements covered by one 16-bit metadata word.
WORD = 16
#: Valid nibbles ``i0 | i1 << 2`` with ``i0 < i1``.
VALID_NIBBLES = (0x4, 0x8, 0x9, 0xC, 0xD, 0xE)


def round_capacity(length: int) -> int:
    """Smallest token capacity (a multiple of CHUNK) that holds ``length`` tokens."""
    return max(CHUNK, -(-length // CHUNK) * CHUNK)


def keep_mask_2to4(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the 2 largest-magnitude elements of each group of 4 along the last dim.

    Element i of a group is kept when fewer than 2 elements beat it, where j beats i if
    |x_j| > |x_i|, or |x_j| == |x_i| and j < i. The CUDA compressor uses the same rule.
    ``weight`` (broadcast to x, float32): rank by |x| * weight instead (error-aware choices).
    """
    if x.shape[-1] % 4:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of 4")
    a = x.abs()
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()  # exact; keeps float64 inputs at full precision
    if weight is not None:
        a = a * weight.to(a.dtype)
    a = a.unflatten(-1, (-1, 4))
    ai, aj = a.unsqueeze(-1), a.unsqueeze(-2)  # [..., 4 (i), 1], [..., 1, 4 (j)]
    idx = torch.arange(4, device=x.device)
    lower = idx.view(1, 4) < idx.view(4, 1)  # [i, j]: j < i
    beats = (aj > ai) | ((aj == ai) & lower)
    return (beats.sum(-1) < 2).flatten(-2)


def prune_2to4(x: torch.Tensor, dim: int = -1, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the 2 smallest-magnitude elements of every group of 4 along ``dim`` (by |x| * weight
    when a weight broadcastable to x is given)."""
    xt = x.movedim(dim, -1)
    wt = None if weight is None else weight.expand_as(x).movedim(dim, -1)
    return torch.where(keep_mask_2to4(xt, wt), xt, torch.zeros_like(xt)).movedim(-1, dim)


def prune_k(k: torch.Tensor, channel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """K pruned 2:4 along head_dim (what the kernels attend to); ``channel_weight [..., 1, D]``
    ranks channels by |k| * weight (selection.channel_weights)."""
    return prune_2to4(k, -1, channel_weight)


def prune_v(v: torch.Tensor, token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """V ``[..., L, D]`` pruned 2:4 along the sequence (L must be a multiple of 4); ``token_weight
    [..., L, 1]`` ranks tokens by |v| * weight (selection.token_weights) and compensates the dropped values in the
    kept ones (:func:`compensate_v`)."""
    if token_weight is None:
        return prune_2to4(v, -2)
    return compensate_v(v, token_weight)


def compensate_v(v: torch.Tensor, token_weight: torch.Tensor) -> torch.Tensor:
    """V pruned 2:4 along the sequence by |v| * w, the kept pair of each group of 4 tokens (per channel) moved so
    that the group's output under the expected attention m = w^2 (w: selection.token_weights, the square root of
    the prompt's mass) is unchanged: m_a d_a + m_b d_b = m_c v_c + m_d v_d with the least-norm d (d_i = r m_i /
    (m_a^2 + m_b^2)), each kept value then clipped to the group's largest |v| (so it never leaves the range the
    block had). A group whose 4 weights are equal (tokens with no attention estimate: they weigh 1) is only pruned.
    The float32 steps are the compressor kernels' (templates/cache/pack.cuh, select_2of4): bit-exact."""
    xt = v.movedim(-2, -1)                                                  # [..., D, L]
    wt = token_weight.expand_as(v).movedim(-2, -1).float()
    keep = keep_mask_2to4(xt, wt).unflatten(-1, (-1, 4))
    x = xt.float().unflatten(-1, (-1, 4))
    w = wt.unflatten(-1, (-1, 4))
    m = w * w
    zero = torch.zeros((), device=v.device)
    r = torch.where(keep, zero, m * x).sum(-1, keepdim=True)               # two non-zero terms: one rounding
    den = torch.where(keep, m * m, zero).sum(-1, keepdim=True).clamp(min=1e-30)
    bound = x.abs().amax(-1, keepdim=True)
    moved = torch.minimum(torch.maximum(x + r * m / den, -bound), bound)
    flat = (w == w[..., :1]).all(-1, keepdim=True)
    out = torch.where(keep, torch.where(flat, x, moved), zero)
    return out.flatten(-2).to(v.dtype).movedim(-1, -2)


def _to_int16(words: torch.Tensor) -> torch.Tensor:
    return (words - (words >= 0x8000).to(words.dtype) * 0x10000).to(torch.int16)


def compress_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4-compress along the last dim: values ``[..., K/2]`` and int16 words ``[..., K/16]``."""
    if x.shape[-1] % WORD:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of {WORD}")
    keep = keep_mask_2to4(x).unflatten(-1, (-1, 4))
    groups = x.unflatten(-1, (-1, 4))
    # positions of the kept pair, ascending: i0 is the first kept index, i1 the last
    pos = torch.arange(4, device=x.device).expand_as(keep)
    i0 = torch.where(keep, pos, 4).amin(-1)
    i1 = torch.where(keep, pos, -1).amax(-1)
    vals = torch.stack((groups.gather(-1, i0.unsqueeze(-1)).squeeze(-1),
                        groups.gather(-1, i1.unsqueeze(-1)).squeeze(-1)), -1).flatten(-2)
    nib = (i0 | (i1 << 2)).to(torch.int32).unflatten(-1, (-1, 4))
    shifts = torch.tensor([0, 4, 8, 12], device=x.device, dtype=torch.int32)
    words = (nib << shifts).sum(-1)
    return vals, _to_int16(words)


def decompress_rows(vals: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`compress_rows` (dropped elements come back as zeros)."""
    w = words.to(torch.int32) & 0xFFFF
    shifts = torch.tensor([0, 4, 8, 12], device=vals.device, dtype=torch.int32)
    nib = ((w.unsqueeze(-1) >> shifts) & 0xF).flatten(-2)  # [..., K/4]
    i0, i1 = (nib & 3).long(), (nib >> 2).long()
    pairs = vals.unflatten(-1, (-1, 2))
    out = torch.zeros(*pairs.shape[:-1], 4, dtype=vals.dtype, device=vals.device)
    out.scatter_(-1, i0.unsqueeze(-1), pairs[..., :1])
    out.scatter_(-1, i1.unsqueeze(-1), pairs[..., 1:])
    return out.flatten(-2)


def _pad_tokens(x: torch.Tensor, capacity: int) -> torch.Tensor:
    length = x.shape[-2]
    if capacity % CHUNK or capacity < length:
        raise ValueError(
            f"capacity {capacity} must be a multiple of {CHUNK} and at least the length {length}")
    if length == capacity:
        return x
    pad = x.new_zeros(*x.shape[:-2], capacity - length, x.shape[-1])
    return torch.cat((x, pad), -2)


# --- fragment permutations (see the module docstring) ---------------------------------

def _k_tile(vals: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, cap, half = vals.shape
    D = half * 2
    KS = D // 32
    # vals[b, h, T*16 + r8*8 + g, ks*16 + hh*8 + q*2 + lo] -> [b, h, T, ks, g, q, hh, r8, lo]
    v = vals.reshape(B, H, cap // 16, 2, 8, KS, 2, 4, 2).permute(0, 1, 2, 5, 4, 7, 6, 3, 8)
    # words[b, h, T*16 + r8*8 + g, ks*2 + qq] -> [b, h, T, g, qq, ks, r8]
    m = words.reshape(B, H, cap // 16, 2, 8, KS, 2).permute(0, 1, 2, 4, 6, 5, 3)
    return v.reshape(B, H, cap, half).contiguous(), m.reshape(B, H, cap, D // 16).contiguous()


def _k_untile(vals: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, cap, half = vals.shape
    D = half * 2
    KS = D // 32
    v = vals.reshape(B, H, cap // 16, KS, 8, 4, 2, 2, 2).permute(0, 1, 2, 7, 4, 3, 6, 5, 8)
    m = meta.reshape(B, H, cap // 16, 8, 2, KS, 2).permute(0, 1, 2, 6, 3, 5, 4)
    return v.reshape(B, H, cap, half), m.reshape(B, H, cap, D // 16)


def _v_tile(vals: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, D, half = vals.shape
    cap = half * 2
    MT, NC = D // 16, cap // CHUNK
    # vals[b, h, mt*16 + r8*8 + g, c*16 + hh*8 + q*2 + lo] -> [b, h, c, mt, g, q, hh, r8, lo]
    v = vals.reshape(B, H, MT, 2, 8, NC, 2, 4, 2).permute(0, 1, 5, 2, 4, 7, 6, 3, 8)
    # words[b, h, mt*16 + r8*8 + g, c*2 + qq] -> [b, h, c, g, qq, mt, r8]
    m = words.reshape(B, H, MT, 2, 8, NC, 2).permute(0, 1, 5, 4, 6, 2, 3)
    return (v.reshape(B, H, cap // 2, D).contiguous(),
            m.reshape(B, H, cap // 16, D).contiguous())


def _v_untile(vals: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, half, D = vals.shape
    cap = half * 2
    MT, NC = D // 16, cap // CHUNK
    v = vals.reshape(B, H, NC, MT, 8, 4, 2, 2, 2).permute(0, 1, 3, 7, 4, 2, 6, 5, 8)
    m = meta.reshape(B, H, NC, 8, 2, MT, 2).permute(0, 1, 5, 6, 3, 2, 4)
    return v.reshape(B, H, D, half), m.reshape(B, H, D, cap // 16)


def _check_dense(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what} must be 4-D [batch, kv_heads, tokens, head_dim], got {tuple(x.shape)}")
    if x.shape[-1] % 32:
        raise ValueError(f"{what} head_dim {x.shape[-1]} is not a multiple of 32")


def pack_k(k: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and pack dense K ``[B, H, L, D]`` into the kernel layout: (values, meta)."""
    _check_dense(k, "k")
    cap = round_capacity(k.shape[-2]) if capacity is None else capacity
    vals, words = compress_rows(_pad_tokens(k, cap))
    return _k_tile(vals, words)


def unpack_k(vals: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense (pruned) K ``[B, H, cap, D]`` from the kernel layout."""
    return decompress_rows(*_k_untile(vals, meta))


def pack_v(v: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and pack dense V ``[B, H, L, D]`` into the kernel layout: (values, meta)."""
    _check_dense(v, "v")
    cap = round_capacity(v.shape[-2]) if capacity is None else capacity
    vals, words = compress_rows(_pad_tokens(v, cap).transpose(-1, -2))
    return _v_tile(vals, words)


def unpack_v(vals: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense (pruned) V ``[B, H, cap, D]`` from the kernel layout."""
    return decompress_rows(*_v_untile(vals, meta)).transpose(-1, -2)


def packed_nbytes(batch: int, kv_heads: int, capacity: int, head_dim: int, itemsize: int = 2) -> int:
    """Bytes of one packed tensor, values plus metadata (9/16 of dense for 16-bit types)."""
    elems = batch * kv_heads * capacity * head_dim
    return elems // 2 * itemsize + elems // WORD * 2


def block_prune_loss(x: torch.Tensor, kind: str, block: int, channel_weight: torch.Tensor | None = None,
                     token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Summed |x| that 2:4 drops, per whole block of tokens: ``[B, H, L // block]`` (float32).

    K ``[B, H, L, D]`` groups along head_dim, V groups of 4 tokens per channel (the GPU
    scoring kernel computes the same in one pass). ``channel_weight [B, H, 1, D]`` (K): the
    dropped |k| * weight, with the channels chosen by that product; ``token_weight [B, H, L, 1]``
    (V) likewise per token.
    """
    n = x.shape[-2] // block
    xb = x[..., : n * block, :].float()
    if kind == "k" and channel_weight is not None:
        xb = xb * channel_weight.float()
    if kind == "v" and token_weight is not None:
        xb = xb * token_weight[..., : n * block, :].float()
    kept = prune_k(xb) if kind == "k" else prune_v(xb)
    dropped = (xb.abs() - kept.abs()).unflatten(-2, (n, block))
    return dropped.sum((-1, -2))
