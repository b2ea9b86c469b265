"""Torch operations over a loaded library: input checks, dispatch and custom ops.

Each kernel entry point is wrapped as a ``torch.library.custom_op`` with a fake (meta)
implementation, so ``torch.compile`` can trace through it; it launches on the current CUDA
stream and allocates nothing on the host side, so it can be captured in a CUDA graph. A custom op
receives its library's key and looks the library up in the registry's table.

Modules: ``base`` (PackedKV, allocation, launch), ``checks`` (input checks), ``packing``
(compression), ``decoding``, ``prefilling`` (and the prefill kernel rule), ``cache_kernels`` (the
kernels over a HieraCache's block tables), ``graphs`` (CUDA-graph capture).
"""

from ..tiles import choose_splits
from .base import PackedKV
from .cache_kernels import (append_cache, channel_weights, decode_cache, fill_blocks, mass_stats, prefill_cache,
                            score_blocks, select_blocks, token_mass)
from .decoding import decode
from .graphs import capture_graph
from .packing import compress, widen8
from .prefilling import KERNELS, as_model_dtype, choose_kernel, prefill

__all__ = ["KERNELS", "PackedKV", "append_cache", "as_model_dtype", "capture_graph", "choose_kernel", "choose_splits",
           "compress", "decode", "decode_cache", "fill_blocks", "prefill", "prefill_cache", "score_blocks",
           "select_blocks", "token_mass", "mass_stats", "channel_weights", "widen8"]
