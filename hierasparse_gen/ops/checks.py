"""Input checks of the ops: every refusal is an InputError "what: problem. Fix: ...", raised
before any launch. The alignment checks and copies run inside the custom ops only (torch.compile
cannot trace data_ptr())."""

from __future__ import annotations

import torch

from ..errors import InputError
from .base import DTYPES, PackedKV


def fail(what: str, problem: str, fix: str):
    raise InputError(f"{what}: {problem}. Fix: {fix}")


def check_same_device(q: torch.Tensor, fix: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != q.device:
            fail(name, f"on {t.device} but q is on {q.device}", fix)


def check_cuda(t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        fail(what, f"expected a torch.Tensor, got {type(t).__name__}", "pass a CUDA tensor")
    if t.device.type != "cuda":
        fail(what, f"tensor is on {t.device}", f"move it to the GPU ({what}.cuda())")


def check_dtype(t, what: str) -> str:
    if t.dtype not in DTYPES:
        fail(what, f"dtype {t.dtype} is not supported", "use torch.float16 or torch.bfloat16")
    return DTYPES[t.dtype]


def check_aligned(t, what: str, nbytes: int) -> None:
    if t.data_ptr() % nbytes:
        fail(what, f"data pointer is not {nbytes}-byte aligned",
             f"pass a tensor whose storage starts on a {nbytes}-byte boundary (.clone())")


def check_pointers(q, k_vals, k_meta, v_vals, v_meta) -> None:
    """Q loads 4 bytes at a time, the packed K/V 16 (a dense e4m3 tensor has no metadata)."""
    check_aligned(q, "q", 4)
    for t, name in ((k_vals, "k.values"), (k_meta, "k.meta"), (v_vals, "v.values"), (v_meta, "v.meta")):
        if t is not None:
            check_aligned(t, name, 16)


def rows16(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] whose rows start on 16-byte boundaries (the compression, scoring and fill
    kernels load 16 bytes at a time); other layouts are copied once."""
    if x.stride(3) != 1 or x.data_ptr() % 16 or any(st % 8 for st in x.stride()[:3]):
        return x.clone(memory_format=torch.contiguous_format)  # a fresh, aligned allocation
    return x


def rows16_strided(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] as the sm_90a kernels read it (16-byte aligned rows at least D apart, strides nonzero
    multiples of 8 elements: Q's 16-byte loads, K's tensor map); a copy when it is not (one-query views and
    expanded tensors may say less)."""
    if (x.data_ptr() % 16 or any(t % 8 or t == 0 for t in x.stride()[:3]) or x.stride(2) < x.shape[3]
            or x.stride(3) != 1):
        return x.clone(memory_format=torch.contiguous_format)
    return x


def check_packed(t, kind: str, what: str) -> PackedKV:
    if not isinstance(t, PackedKV) or t.kind != kind:
        fail(what, f"expected the PackedKV returned by compress_{kind}(), got {type(t).__name__}"
             + (f" of kind {t.kind!r}" if isinstance(t, PackedKV) else ""),
             f"pass lib.compress_{kind}({kind}_dense)")
    for name, x in (("values", t.values), ("meta", t.meta)):
        if x is None and name == "meta" and t.scales is not None:
            continue  # dense e4m3
        check_cuda(x, f"{what}.{name}")
        if not x.is_contiguous():
            fail(f"{what}.{name}", "packed tensors must be contiguous", "do not slice or transpose them")
    return t


def check_queries(q: torch.Tensor, B: int, Hkv: int, D: int, dtype) -> None:
    """A prefill chunk's queries ``[B, Hq, Lq, D]`` against keys of B sequences, Hkv heads, head_dim D."""
    check_cuda(q, "q")
    check_dtype(q, "q")
    if q.dim() != 4:
        fail("q", f"expected 4 dims [batch, q_heads, queries, head_dim], got shape {tuple(q.shape)}",
             "pass the chunk's queries as [batch, q_heads, queries, head_dim]")
    if q.shape[0] != B or q.shape[3] != D or q.shape[1] % Hkv or q.shape[2] < 1:
        fail("q", f"shape {tuple(q.shape)} does not fit the keys ({B} sequences, {Hkv} KV heads, head_dim {D})",
             f"pass [{B}, a multiple of {Hkv} heads, >= 1 queries, {D}]")
    if q.dtype != dtype:
        fail("q", f"dtype {q.dtype} but the keys are {dtype}", "use one dtype for Q, K and V")
    if q.stride(3) != 1 or any(x % 2 for x in q.stride()[:3]):
        fail("q", f"strides {q.stride()} not supported", "pass q.contiguous()")


def check_lengths(x, what: str, B: int, device, fix: str) -> torch.Tensor | None:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or tuple(x.shape) != (B,) or x.device != device:
        fail(what, f"expected an int32 tensor of shape ({B},) on {device}", fix)
    return x.contiguous()


def check_num_splits(num_splits) -> None:
    if num_splits is not None and num_splits < 1:
        fail("num_splits", f"{num_splits} is not positive", "pass None (automatic) or a positive count")
