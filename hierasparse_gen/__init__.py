"""hierasparse-gen: a code-generating kernel compiler for 2:4-sparse KV-cache attention.

Flow: spec (YAML) -> variants -> rendered CUDA -> compiled C-ABI library + manifest ->
registry (ctypes) -> torch custom ops.
"""

__version__ = "0.1.0"


def load(path_or_spec, **kwargs):
    """Load a built library (a build folder, its manifest.json, or a spec YAML to build first)."""
    from .library import load as _load
    return _load(path_or_spec, **kwargs)


def enable(model, lib=None, **kwargs):
    """Turn a transformers model to sparse-KV attention (see :func:`hierasparse_gen.hf.enable`)."""
    from .hf import enable as _enable  # transformers is needed only here
    return _enable(model, lib, **kwargs)


__all__ = ["enable", "load", "__version__"]
