"""Quality of the sparse KV cache on a real model: ``hierasparse-gen eval`` (see docs/eval.md).

Dense and sparse side by side per setting: teacher-forced decode after a long prefill (NLL,
perplexity, KL against dense, top-1 agreement), passkey retrieval, and the cache's bytes per
token. Needs transformers (and, for GGUF models, gguf and accelerate: the ``eval`` extra).
"""

from .quality import POLICIES, Setting
from .run import evaluate, settings_grid

__all__ = ["POLICIES", "Setting", "evaluate", "settings_grid"]
