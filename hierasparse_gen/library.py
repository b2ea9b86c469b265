"""What :func:`hierasparse_gen.load` returns: a registry :class:`~hierasparse_gen.registry.Library`
(manifest, ctypes handle, dispatch) with the torch ops as methods. It sits above both: the
registry knows nothing of the ops, the ops look libraries up in the registry's table."""

from __future__ import annotations

from pathlib import Path

from . import ops
from .registry import Library, load as _load


class KernelLibrary(Library):
    """A loaded build with its operations (see :mod:`hierasparse_gen.ops`)."""

    def compress_k(self, k, capacity: int | None = None, storage: str = "model", sparse: bool = True) -> ops.PackedKV:
        """Prune K ``[B, Hkv, L, D]`` 2:4 along head_dim and pack it (GPU). Returns a PackedKV.
        ``storage="float8_e4m3"``: kept values in e4m3 with a float16 scale per token (format_fp8),
        for the e4m3 decode tiers of a spec (packed by torch on the GPU, not by a kernel yet);
        with ``sparse=False`` every value, dense (the e4m3 cache serving engines ship)."""
        return ops.compress(self, k, "k", capacity, storage, sparse)

    def compress_v(self, v, capacity: int | None = None, storage: str = "model", sparse: bool = True) -> ops.PackedKV:
        """Prune V ``[B, Hkv, L, D]`` 2:4 along tokens and pack it (GPU). Returns a PackedKV.
        ``storage``, ``sparse``: as :meth:`compress_k`."""
        return ops.compress(self, v, "v", capacity, storage, sparse)

    def prefill(self, q, k, v, seqlens=None, *, qlens=None, scale: float | None = None, kernel: str = "auto"):
        """Causal attention of a query chunk ``q [B, Hq, Lq, D]`` (the last ``qlens[b]`` of
        ``seqlens[b]`` tokens) over packed 2:4 V and K packed (all-2:4) or dense (balanced).
        ``kernel``: "auto", "wgmma" or "mma_sp" (see :func:`hierasparse_gen.ops.choose_kernel`).
        Returns (out, lse)."""
        return ops.prefill(self, q, k, v, seqlens, qlens=qlens, scale=scale, kernel=kernel)

    def decode(self, q, k, v, seqlens=None, *, scale: float | None = None,
               num_splits: int | None = None, check_seqlens: bool = True):
        """Decode attention of ``q [B, Hq, D]`` over packed K and V. Returns (out, lse)."""
        return ops.decode(self, q, k, v, seqlens, scale=scale, num_splits=num_splits, check_seqlens=check_seqlens)


def load(path_or_spec: str | Path, **kwargs) -> KernelLibrary:
    """Load a build folder, a manifest.json, or a spec YAML (built first when needed)."""
    return _load(path_or_spec, library_class=KernelLibrary, **kwargs)
