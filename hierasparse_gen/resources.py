"""Where the files shipped with the package live: the kernel templates and the example specs.

In the repository they are the top-level ``templates/`` and ``specs/`` folders; a wheel carries
them as the data packages ``hierasparse_gen.templates`` and ``hierasparse_gen.specs`` (see
pyproject.toml). Standard library only, so spec loading stays light.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SOURCE_TREE = Path(__file__).resolve().parent.parent


def data_dir(name: str) -> Path | None:
    """The folder shipped as ``hierasparse_gen.<name>`` (an installed wheel or an editable install),
    else ``<name>/`` of the source tree this package runs from; None when neither exists."""
    try:
        found = importlib.util.find_spec(f"{__package__}.{name}")
    except (ImportError, ValueError):
        found = None
    for location in (found.submodule_search_locations or []) if found else []:
        if Path(location).is_dir():
            return Path(location)
    # a source checkout run without installing (PYTHONPATH); pyproject.toml marks it, so that a
    # stray folder of that name beside an installed package is never taken
    path = _SOURCE_TREE / name
    return path if path.is_dir() and (_SOURCE_TREE / "pyproject.toml").is_file() else None
