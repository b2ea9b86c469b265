"""The cache's 2:4 values in the core-matrix layout that a wgmma descriptor reads (this experiment only).

A wgmma reads an operand from shared memory in 8 x 8 "core matrices" of 16-bit elements (8 rows of 16 bytes,
128 bytes each). With the compressed rows laid out that way a kernel can hand the 2:4 values to
``wgmma.mma_async.sp`` by descriptor instead of loading fragments into registers; the lane-ordered fragments
of the cache format cannot be addressed so (a lane's 16 bytes hold two rows). The library's kernels do not
read this layout: ``wgmma_n128_prefill.cu.j2`` beside this file does, and its driver
(``experiments/prefill_sm90_edits/wgmma_prefill_variants.py`` with ``CORE_LAYOUT=``) converts the cache's
values with these two functions. Metadata stays as the cache stores it.

* K: core matrix ``(r // 8) * (D/16) + c // 8`` holds compressed rows r (tokens) and kept columns c, row
  ``r % 8`` at 16 bytes a row: 8-token groups 2*D bytes apart, contiguous across chunks.
* V, per 32-token chunk (16 kept columns of V^T): core matrix ``(ch // 8) * 2 + (c % 16) // 8`` holds
  channel ch and kept column c; chunks D * 32 bytes apart.

Only the package's public format functions are used: the kept values in logical order are recovered by
unpacking to dense and compressing again (dropped elements unpack as zeros, so the kept pair is found again;
where a kept value is itself zero the value written is zero either way).
"""
import torch

from hierasparse_gen import format as fmt


def k_core_matrices(vals: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The cache's K values ``[B, H, cap, D/2]`` (fragment order, with their metadata) in the core-matrix
    layout, same shape."""
    logical, _ = fmt.compress_rows(fmt.unpack_k(vals, meta))
    B, H, cap, half = logical.shape
    return logical.reshape(B, H, cap // 8, 8, half // 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(
        B, H, cap, half).contiguous()


def v_core_matrices(vals: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The cache's V values ``[B, H, cap/2, D]`` (fragment order, with their metadata) in the core-matrix
    layout, same shape."""
    B, H, half, D = vals.shape
    logical, _ = fmt.compress_rows(fmt.unpack_v(vals, meta).transpose(-1, -2))  # [B, H, D, cap/2]
    return logical.reshape(B, H, D // 8, 8, half // 16, 2, 8).permute(0, 1, 4, 2, 5, 3, 6).reshape(
        B, H, half, D).contiguous()
