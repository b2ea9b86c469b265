"""FP8 (e4m3) storage of KV-cache blocks: scales, packing and unpacking, in plain torch (CPU or GPU).

These functions are the bit-exact oracle of the e4m3 cache: the simulation stores what they
produce, and the compressor kernels (a later change) must write the same bytes.

Which blocks
------------
K and V each have a storage: ``"model"`` (the model's dtype, as today) or ``"float8_e4m3"``. With
e4m3, the *eligible* blocks of that tensor (full blocks between the sink and the window) are
stored in e4m3, dense or 2:4 as the ratio says; the sink, the window and the newest partial block
stay dense in the model's dtype.

Scales
------
One scale per (token, KV head), for K and for V, stored as **float16**. A token's scale is the
largest magnitude among the values the block keeps of that token, divided by 448 (e4m3's largest
finite value), rounded *up* to a float16, so ``|x| / scale <= 448`` always holds and the
saturating conversion never clips. float16 rather than float32 because the scale is the e4m3
block's only overhead (2 bytes per token and head instead of 4: 3 % of an e4m3 row at head_dim 64)
and float16's range covers it: a float16 or bfloat16 cache's K/V up to 2.9e7 in magnitude (larger
is refused, see :func:`token_scales`). Below float16's normal range (a token whose largest value
is under 448 * 2**-14, about 0.027) the rounded-up scale is coarser and maps the token's largest
value under 448: e4m3 still keeps its 3 mantissa bits for every quotient above 2**-6, i.e. values
above about 2**-30 keep full precision; only such tokens are not bit-exact under a second
pack/unpack round trip. A token whose kept values are all zero gets scale
1 (any positive scale stores zeros; 1 keeps the division defined). Infinite or NaN values are
refused (:class:`InputError`): e4m3 has no infinity and a scale cannot absorb one.

Rounding: ``x / scale`` in float32, then round to nearest, ties to even, into
``torch.float8_e4m3fn`` (torch's conversion, the oracle; the kernels' ``cvt.rn.satfinite`` does the
same). Values below e4m3's smallest subnormal (2**-9 times the scale) round to zero; between 2**-9
and 2**-6 they are subnormal (fewer mantissa bits): an absolute error of at most 2**-10 times the
scale, i.e. 1/458752 of the token's largest value.

In decode, K's scale multiplies that key's score (``s = scale_k[t] * (q . k8[t])``) and V's folds
into the probabilities (``o = sum_t (p[t] * scale_v[t]) * v8[t]``): both are per token, so they leave
the GEMMs untouched.

2:4 in e4m3
-----------
Which 2 of every 4 are kept is decided on the **original** values by :func:`format.keep_mask_2to4`
(before quantization): the choice is then the one the model-dtype 2:4 cache makes (same metadata
words, same prune loss), quantization cannot create ties that would change it, and the compressor
reads the model-dtype values anyway when a block leaves the window. The scale is then taken over
the kept values only. For K (2:4 along head_dim, per token) a token's largest value is always
kept, so the scale is that of the dense token. For V (2:4 along the sequence: groups of 4 tokens
per channel) a token may lose its largest channels to its neighbours; each kept value is still
quantized with its *own* token's scale, which is what lets the scale fold into P: the scale depends
on the token (a column of ``V^T``), never on the channel. The metadata words are those of
:mod:`format` (``format.compress_rows`` of the original values) and the kept values follow in
the same order, as e4m3 bytes.

Logical layout (per batch and KV head, one block of ``S`` tokens, head_dim ``D``)
-------------------------------------------------------------------------------
* dense e4m3: values ``uint8 [S, D]``, scales ``float16 [S]``: ``S*D + 2*S`` bytes.
* 2:4 e4m3, K: values ``uint8 [S, D/2]``, metadata ``int16 [S, D/16]``, scales ``float16 [S]``.
* 2:4 e4m3, V: values ``uint8 [D, S/2]``, metadata ``int16 [D, S/16]``, scales ``float16 [S]``.
  Both 2:4 forms: ``S*D/2 + S*D/8 + 2*S`` bytes.

Kernel layout (flat packed tensors, :func:`pack_k` / :func:`pack_v`)
-------------------------------------------------------------------
The bytes of the logical 2:4 layout in :mod:`format`'s fragment order of ``mma.sp.m16n8k32``, one
byte per value instead of two (lane ``l`` loads its 8 fragment values with one 8-byte load and
converts them in registers), the metadata words exactly :mod:`format`'s, and the scales per token:
K values ``uint8 [B, H, cap, D/2]``, K meta ``int16 [B, H, cap, D/16]``, V values ``uint8 [B, H,
cap/2, D]``, V meta ``int16 [B, H, cap/16, D]``, scales ``float16 [B, H, cap]`` for each (tokens past
the length are zeros with scale 1).

Dense e4m3 (:func:`pack_k_dense` / :func:`pack_v_dense`: the like-for-like FP8 cache) is stored in the
A-fragment order of ``mma.m16n8k16``, two k-steps per lane and 16 bytes: K per 16-token tile and 32-channel
k-step ``[T, ks, g, q, j, hi, r8, lo]`` for token ``16T + 8 r8 + g``, channel ``32 ks + 16 j + 8 hi + 2 q + lo``;
V per 32-token chunk and 16-channel tile ``[c, mt, g, q, j, hi, r8, lo]`` for channel ``16 mt + 8 r8 + g``,
token ``32 c + 16 j + 8 hi + 2 q + lo``. Values ``uint8 [B, H, cap, D]``, scales ``float16 [B, H, cap]``.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .format import (WORD, _k_tile, _k_untile, _pad_tokens, _v_tile, _v_untile, compress_rows, decompress_rows,
                     keep_mask_2to4, round_capacity)
# the byte account and the storage names are plain Python in policy (the cache and the simulation share them)
from .policy import SCALE_BYTES, STORAGES, block_nbytes, check_storage

#: e4m3's largest finite magnitude.
E4M3_MAX = 448.0
#: dtype of the stored scales (SCALE_BYTES each).
SCALE_DTYPE = torch.float16
_F16_MAX = 65504.0


def _round_up_f16(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= x (x float32, finite, 0 <= x <= 65504)."""
    h = x.to(torch.float16)
    low = h.float() < x
    # a positive float16's bit pattern as an integer is monotonic: +1 is the next float16 up
    return torch.where(low, (h.view(torch.int16) + 1).view(torch.float16), h)


def check_storable(x: torch.Tensor, amax: torch.Tensor | None = None) -> None:
    """InputError unless every value of ``x`` (or the magnitudes ``amax`` that set scales) can be stored in e4m3
    with a float16 scale: finite, and at most 448 x float16's largest value."""
    if not bool(torch.isfinite(x).all()):
        raise InputError("float8_e4m3 storage: the K/V to store hold inf or NaN, which e4m3 cannot represent. "
                         "Fix: find where the model overflows (a float16 model may need bfloat16), or keep "
                         "that tensor in the model dtype (storage 'model')")
    top = float((x.float().abs() if amax is None else amax).max()) if x.numel() else 0.0
    if top > _F16_MAX * E4M3_MAX:
        raise InputError(f"float8_e4m3 storage: a K/V value of magnitude {top:.3g} needs a scale beyond float16's "
                         f"range. Fix: keep that tensor in the model dtype (storage 'model')")


def token_scales(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """float16 scales ``[..., S]`` of ``x [..., S, D]``: the largest |x| of each token (among ``keep``,
    when given) over 448, rounded up; 1 for a token with nothing but zeros."""
    a = x.float().abs()
    if keep is not None:
        a = torch.where(keep, a, torch.zeros_like(a))
    amax = a.amax(-1)
    check_storable(x, amax)
    # a tensor divisor: with a Python scalar, CUDA torch multiplies by its rounded reciprocal instead of
    # dividing, which differs in the last bit from the CPU (and the kernels) for some values
    scale = _round_up_f16(amax / torch.full_like(amax, E4M3_MAX))
    # amax / scale is rounded in float32: bump the rare scale whose quotient lands above 448
    over = amax / scale.float() > E4M3_MAX
    scale = torch.where(over, (scale.view(torch.int16) + 1).view(torch.float16), scale)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def quantize(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """e4m3 bytes (``uint8``, same shape) of ``x [..., S, D] / scales [..., S]``."""
    q = x.float() / scales.float().unsqueeze(-1)
    return q.to(torch.float8_e4m3fn).view(torch.uint8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Values of e4m3 bytes ``[..., S, D]`` times their token's scale ``[..., S]``, in ``dtype``
    (the product is exact in float32; a 16-bit dtype rounds it once)."""
    return (codes.view(torch.float8_e4m3fn).float() * scales.float().unsqueeze(-1)).to(dtype)


def _check(x: torch.Tensor, what: str, multiple: int, axis: int) -> None:
    if x.dim() < 2 or x.shape[axis] % multiple:
        raise InputError(f"{what}: shape {tuple(x.shape)} needs [..., tokens, head_dim] with "
                         f"{'tokens' if axis == -2 else 'head_dim'} a multiple of {multiple}. Fix: pack whole "
                         f"blocks (a multiple of 32 tokens, head_dim a multiple of 32)")


def pack_dense(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense e4m3: (values ``uint8 [..., S, D]``, scales ``float16 [..., S]``)."""
    _check(x, "pack_dense", 1, -1)
    scales = token_scales(x)
    return quantize(x, scales), scales


def unpack_dense(codes: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return dequantize(codes, scales, dtype)


def pack_k_2to4(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K ``[..., S, D]`` 2:4 along head_dim in e4m3: (values ``uint8 [..., S, D/2]``, metadata
    ``int16 [..., S, D/16]``, scales ``float16 [..., S]``)."""
    _check(k, "pack_k_2to4", WORD, -1)
    keep = keep_mask_2to4(k)
    scales = token_scales(k, keep)
    codes = quantize(k, scales)
    _, words = compress_rows(k)
    return codes[keep].view(*k.shape[:-1], k.shape[-1] // 2), words, scales


def unpack_k_2to4(vals: torch.Tensor, words: torch.Tensor, scales: torch.Tensor,
                  dtype=torch.float32) -> torch.Tensor:
    """Dense ``[..., S, D]`` (dropped elements 0) from :func:`pack_k_2to4`'s bytes."""
    return dequantize(decompress_rows(vals, words), scales, dtype)


def pack_v_2to4(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V ``[..., S, D]`` 2:4 along the sequence in e4m3: (values ``uint8 [..., D, S/2]``, metadata
    ``int16 [..., D, S/16]``, scales ``float16 [..., S]``: per token, each kept value with its own
    token's scale)."""
    _check(v, "pack_v_2to4", WORD, -2)
    vt = v.transpose(-1, -2)
    keep_t = keep_mask_2to4(vt)
    scales = token_scales(v, keep_t.transpose(-1, -2))
    codes_t = quantize(v, scales).transpose(-1, -2)
    _, words = compress_rows(vt)
    return codes_t[keep_t].view(*vt.shape[:-1], vt.shape[-1] // 2), words, scales


def unpack_v_2to4(vals: torch.Tensor, words: torch.Tensor, scales: torch.Tensor,
                  dtype=torch.float32) -> torch.Tensor:
    """Dense ``[..., S, D]`` (dropped elements 0) from :func:`pack_v_2to4`'s bytes."""
    return dequantize(decompress_rows(vals, words).transpose(-1, -2), scales, dtype)


def pack_k(k: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K ``[B, H, L, D]`` 2:4 in e4m3, in the kernel layout: (values, meta, scales), ``capacity`` tokens."""
    cap = round_capacity(k.shape[-2]) if capacity is None else capacity
    vals, words, scales = pack_k_2to4(_pad_tokens(k, cap))
    return (*_k_tile(vals, words), scales)


def pack_v(v: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V ``[B, H, L, D]`` 2:4 in e4m3, in the kernel layout: (values, meta, scales), ``capacity`` tokens."""
    cap = round_capacity(v.shape[-2]) if capacity is None else capacity
    vals, words, scales = pack_v_2to4(_pad_tokens(v, cap))
    return (*_v_tile(vals, words), scales)


def unpack_k(vals: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """What :func:`pack_k`'s bytes hold, ``[B, H, cap, D]`` in ``dtype`` (dropped elements 0)."""
    return unpack_k_2to4(*_k_untile(vals, meta), scales, dtype)


def unpack_v(vals: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """What :func:`pack_v`'s bytes hold, ``[B, H, cap, D]`` in ``dtype`` (dropped elements 0)."""
    return unpack_v_2to4(*_v_untile(vals, meta), scales, dtype)


def kept_positions(words: torch.Tensor) -> torch.Tensor:
    """Index along the compressed dim of every kept value of :func:`format.compress_rows`'s words ``[..., K/16]``:
    ``[..., K/2]`` (int64), in the order the values are stored."""
    w = words.to(torch.int32) & 0xFFFF
    shifts = torch.arange(0, 16, 4, device=words.device, dtype=torch.int32)  # made on the device: capturable
    nib = ((w.unsqueeze(-1) >> shifts) & 0xF).flatten(-2)  # [..., K/4]: one nibble a group of 4
    base = 4 * torch.arange(nib.shape[-1], device=words.device)
    return torch.stack((base + (nib & 3), base + (nib >> 2)), -1).flatten(-2)


def model_dtype_k(vals: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """:func:`pack_k`'s e4m3 bytes as the model-dtype 2:4 values of the same metadata (the 16-bit kernels'
    layout, :func:`format.pack_k`): each value times its token's scale, rounded once into ``dtype``. The
    metadata is unchanged, so (``vals16``, ``meta``) holds exactly what :func:`unpack_k` gives in ``dtype``."""
    codes, words = _k_untile(vals, meta)
    return _k_tile(dequantize(codes, scales, dtype), words)[0]


def model_dtype_v(vals: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """As :func:`model_dtype_k` for :func:`pack_v`'s bytes: V is 2:4 along the tokens, so a value's token (and
    scale) comes from its metadata."""
    codes, words = _v_untile(vals, meta)
    token_scale = scales.unsqueeze(-2).expand(*codes.shape[:-1], scales.shape[-1])
    s = token_scale.gather(-1, kept_positions(words))
    return _v_tile((codes.view(torch.float8_e4m3fn).float() * s.float()).to(dtype), words)[0]


def model_dtype_2to4(vals: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, kind: str, dtype) -> torch.Tensor:
    """:func:`model_dtype_k` (``kind`` "k") or :func:`model_dtype_v`."""
    return (model_dtype_k if kind == "k" else model_dtype_v)(vals, meta, scales, dtype)


# dense fragment orders: (reshape of the row-major codes, permutation to the stored order)
_DENSE_K = (lambda B, H, cap, D: (B, H, cap // 16, 2, 8, D // 32, 2, 2, 4, 2), (0, 1, 2, 5, 4, 8, 6, 7, 3, 9))
_DENSE_V = (lambda B, H, cap, D: (B, H, cap // 32, 2, 2, 4, 2, D // 16, 2, 8), (0, 1, 2, 7, 9, 5, 3, 4, 8, 6))


def _dense_tile(codes: torch.Tensor, order) -> torch.Tensor:
    shape, perm = order
    return codes.reshape(shape(*codes.shape)).permute(perm).reshape(codes.shape).contiguous()


def _dense_untile(vals: torch.Tensor, order) -> torch.Tensor:
    shape, perm = order
    dims = shape(*vals.shape)
    stored = vals.reshape([dims[p] for p in perm])
    return stored.permute(tuple(sorted(range(len(perm)), key=perm.__getitem__))).reshape(vals.shape)


def pack_k_dense(k: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K ``[B, H, L, D]`` dense in e4m3, in the kernel layout: (values, scales), ``capacity`` tokens."""
    cap = round_capacity(k.shape[-2]) if capacity is None else capacity
    codes, scales = pack_dense(_pad_tokens(k, cap))
    return _dense_tile(codes, _DENSE_K), scales


def pack_v_dense(v: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """V ``[B, H, L, D]`` dense in e4m3, in the kernel layout: (values, scales), ``capacity`` tokens."""
    cap = round_capacity(v.shape[-2]) if capacity is None else capacity
    codes, scales = pack_dense(_pad_tokens(v, cap))
    return _dense_tile(codes, _DENSE_V), scales


def unpack_k_dense(vals: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return unpack_dense(_dense_untile(vals, _DENSE_K), scales, dtype)


def unpack_v_dense(vals: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return unpack_dense(_dense_untile(vals, _DENSE_V), scales, dtype)


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """``x [..., S, D]`` through e4m3 with its per-token scales and back, in ``x``'s dtype. On a block already
    pruned 2:4 (dropped elements zero) this is exactly what :func:`stored_values` gives for the 2:4 tier: the
    zeros stay zeros and the scale is the largest kept value's; so the simulation quantizes whatever its tier
    rule kept."""
    scales = token_scales(x)
    return dequantize(quantize(x, scales), scales, x.dtype)


def stored_values(x: torch.Tensor, kind: str, sparse: bool) -> torch.Tensor:
    """What an e4m3 cache holds of whole blocks ``x [..., S, D]`` of K (``kind`` "k") or V, dense or 2:4,
    dequantized into ``x``'s dtype: the values attention reads."""
    if not sparse:
        return unpack_dense(*pack_dense(x), dtype=x.dtype)
    if kind == "k":
        return unpack_k_2to4(*pack_k_2to4(x), dtype=x.dtype)
    return unpack_v_2to4(*pack_v_2to4(x), dtype=x.dtype)


__all__ = ["STORAGES", "E4M3_MAX", "SCALE_BYTES", "SCALE_DTYPE", "check_storage", "block_nbytes", "check_storable",
           "token_scales",
           "quantize", "dequantize", "pack_dense", "unpack_dense", "pack_k_2to4", "unpack_k_2to4", "pack_v_2to4",
           "unpack_v_2to4", "pack_k", "pack_v", "unpack_k", "unpack_v", "pack_k_dense", "pack_v_dense", "unpack_k_dense",
           "unpack_v_dense", "kept_positions", "model_dtype_k", "model_dtype_v",
           "model_dtype_2to4", "fake_quantize",
           "stored_values"]
