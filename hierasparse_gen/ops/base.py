"""What every op shares: the packed tensor type, output allocation, device queries and the launch
of a C entry point of a library (looked up in the registry's table by its key)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import Library, lookup

DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}

#: When True, outputs are filled with NaN (values) / 0x7FFF (metadata) before each launch,
#: so an element a kernel fails to write cannot pass a test.
POISON = False


@dataclass(frozen=True)
class PackedKV:
    """One packed 2:4 tensor of the cache (K or V): values + metadata in the kernel layout, and for e4m3
    storage the per-token scales (format_fp8: values are then uint8 codes). A dense e4m3 tensor has no
    metadata (``meta`` None, values ``uint8 [B, H, cap, D]``)."""
    values: torch.Tensor
    meta: torch.Tensor | None
    kind: str          # "k" or "v"
    length: int        # tokens compressed (the rest of the capacity holds zeros)
    scales: torch.Tensor | None = None  # float16 [B, H, cap]: e4m3 storage

    @property
    def storage(self) -> str:
        return "model" if self.scales is None else "float8_e4m3"

    @property
    def sparse(self) -> bool:
        return self.meta is not None

    @property
    def capacity(self) -> int:
        if not self.sparse:
            return self.values.shape[2]
        return self.meta.shape[2] * (1 if self.kind == "k" else 16)

    @property
    def head_dim(self) -> int:
        return self.values.shape[3] * (2 if self.kind == "k" and self.sparse else 1)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.values, self.meta, self.scales) if t is not None)


def library(key: str) -> Library:
    """The loaded library a custom op was called with (ops pass its key: a string traces)."""
    return lookup(key)


def alloc(shape, dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    # NaN where the dtype has one (0x7F is e4m3's NaN byte), else a value no kernel writes by chance
    fill = {torch.int16: 0x7FFF, torch.uint8: 0x7F}.get(dtype, float("nan"))
    return torch.full(shape, fill, dtype=dtype, device=device)


def fake_alloc(q: torch.Tensor):
    """The allocator of the ops' fake (meta) implementations."""
    return lambda shape, dtype, device: q.new_empty(shape, dtype=dtype)


_CC: dict[int, tuple[int, int]] = {}
_SM_COUNT: dict[int, int] = {}


def device_cc(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CC:
        _CC[index] = torch.cuda.get_device_capability(index)
    return _CC[index]


def sm_count(index: int) -> int:
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def launch(lib, symbol: str, device: torch.device, *args) -> None:
    """Call a C entry point (its last argument, the stream, is the current stream of ``device``)
    and raise a CudaError naming it when it fails."""
    with torch.cuda.device(device):
        code = lib.function(symbol)(*args, torch.cuda.current_stream(device).cuda_stream)
    lib.check(code, symbol)


def ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: 1/sqrt(head_dim) unless given (0.0 is a valid scale)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def eager_or_op(impl, op):
    """The custom op under torch.compile; its implementation, called directly, otherwise: a
    decode step runs these once a layer, and the dispatcher's host time adds up (CUDA graph
    capture sees the same kernel launches either way)."""
    return op if torch.compiler.is_compiling() else impl
