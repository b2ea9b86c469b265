"""Every error the package raises on purpose, under one base.

Each specific error also keeps the built-in base it always had (``ValueError``, ``LookupError``,
``RuntimeError``), so ``except ValueError`` keeps catching a bad spec or a bad tensor, and
``except HieraSparseError`` catches anything of ours. Messages read "problem. Fix: ...".
"""

from __future__ import annotations


class HieraSparseError(Exception):
    """Base of every error raised by hierasparse-gen on purpose."""


class SpecError(HieraSparseError, ValueError):
    """A spec could not be read or is invalid; ``str(e)`` is the complete message."""


class TileError(HieraSparseError, ValueError):
    """Tiles that no CTA of the target arch can hold."""


class InputError(HieraSparseError, ValueError):
    """A tensor or argument handed to an op or the cache is unusable (shape, dtype, device, stride, value)."""


class ToolchainError(HieraSparseError, RuntimeError):
    """nvcc or the CUTLASS headers are missing or unusable."""


class CompileError(HieraSparseError, RuntimeError):
    """nvcc failed on one variant; the message holds the variant, the command and the error."""


class DispatchError(HieraSparseError, LookupError):
    """No variant of the library fits a call; the message says why for every candidate."""


class CudaError(HieraSparseError, RuntimeError):
    """A CUDA call made by the library failed; the message names the call and the error (``code``: the
    cudaError_t value, when the library returned one)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class BuildNotFoundError(HieraSparseError, FileNotFoundError):
    """A build folder, its manifest or its library is missing, unreadable, or from an older version that lacks
    what this one reads; the message says how to rebuild."""


class UnsupportedError(HieraSparseError, NotImplementedError):
    """A feature the sparse KV cache does not offer (beam search, offloading)."""


class CacheFullError(HieraSparseError, RuntimeError):
    """An append would exceed the cache's capacity; nothing was written."""


__all__ = ["HieraSparseError", "SpecError", "TileError", "InputError", "ToolchainError", "CompileError",
           "DispatchError", "CudaError", "BuildNotFoundError", "UnsupportedError",
           "CacheFullError"]
