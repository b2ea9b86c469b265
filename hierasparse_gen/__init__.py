"""hierasparse-gen: a code-generating kernel compiler for 2:4-sparse KV-cache attention.

Flow: spec (YAML) -> variants -> rendered CUDA -> compiled C-ABI library + manifest ->
registry (ctypes) -> torch custom ops.
"""

__version__ = "0.1.0"


def load(path_or_spec, **kwargs):
    """Load a built library (a build folder, its manifest.json, or a spec YAML to build first)."""
    from .registry import load as _load
    return _load(path_or_spec, **kwargs)


__all__ = ["load", "__version__"]
