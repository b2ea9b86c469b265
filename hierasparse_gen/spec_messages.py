"""How spec problems are reported: value descriptions, did-you-mean hints and the generic checks
(mapping, list, integer, string) that every section of the spec checker builds on.

Every problem becomes a :class:`SpecError` whose ``str()`` is the whole message:
``<source>: <key path>: <problem>. Fix: <what to do>``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, NoReturn

from .errors import SpecError

ROOT = "<top level>"

# Example values used in "Fix:" hints for missing keys.
_EXAMPLES = {
    "name": "llama3",
    "shapes": "[{head_dim: 128, num_qo_heads: 32, num_kv_heads: 8}]",
    "archs": "[sm_80, sm_90]",
    "head_dim": "128",
    "num_qo_heads": "32",
    "num_kv_heads": "8",
    "k": "sparse24",
    "v": "sparse24",
}


# --------------------------------------------------------------------------
# Message helpers
# --------------------------------------------------------------------------


def _show(value: Any) -> str:
    """Render a value the way it reads in YAML, shortened."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text


def _describe(value: Any) -> str:
    """'a boolean (true)', 'a list', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int):
        kind = "an integer"
    elif isinstance(value, float):
        kind = "a float"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, (list, tuple)):
        return "a list"
    elif isinstance(value, Mapping):
        return "a mapping"
    else:
        kind = f"a {type(value).__name__}"
    return f"{kind} ({_show(value)})"


def _join(values) -> str:
    return ", ".join(str(v) for v in values)


def _child(path: str, key: Any) -> str:
    key_text = key if isinstance(key, str) else _show(key)
    return key_text if path == ROOT else f"{path}.{key_text}"


def _closest(word: Any, candidates) -> str | None:
    if not isinstance(word, str):
        word = str(word)
    lowered = word.strip().lower()
    for cand in candidates:
        if cand.lower() == lowered:
            return cand
    matches = difflib.get_close_matches(lowered, list(candidates), n=1)
    return matches[0] if matches else None


def _with_suggestion(word: Any, candidates, fix: str) -> str:
    """Prefix ``fix`` with "did you mean 'x'?" when ``word`` is close to a candidate."""
    match = _closest(word, candidates)
    return f"did you mean '{match}'? Otherwise {fix}" if match else fix


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


class _Checks:
    """Reporting and the generic type checks; :class:`spec_check._Checker` adds the spec's sections."""

    def __init__(self, source: str):
        self.source = source

    # -- reporting ---------------------------------------------------------

    def fail(self, path: str, problem: str, fix: str) -> NoReturn:
        fix = fix.strip()
        if not fix.endswith((".", "?", "!")):
            fix += "."
        raise SpecError(f"{self.source}: {path}: {problem}. Fix: {fix}")

    # -- generic shape checks ----------------------------------------------

    def mapping(self, value: Any, path: str, valid, required=(), *, example: str) -> Mapping:
        if not isinstance(value, Mapping):
            where = "the spec" if path == ROOT else path
            self.fail(
                path,
                f"expected a mapping, found {_describe(value)}",
                f"write {where} as 'key: value' pairs, e.g. {example}",
            )
        where = "at the top level" if path == ROOT else f"in {path}"
        for key in value:
            if not (isinstance(key, str) and key in valid):
                match = _closest(key, valid)
                hint = f"did you mean '{match}'?" if match else "remove it."
                self.fail(
                    _child(path, key),
                    f"unknown key {_show(key)}",
                    f"{hint} Valid keys {where}: {_join(valid)}.",
                )
        for key in required:
            if key not in value:
                self.fail(
                    _child(path, key),
                    "required key is missing",
                    f"add it {where}, e.g. {key}: {_EXAMPLES.get(key, '...')}",
                )
        return value

    def seq(self, value: Any, path: str, *, example: str, default: str | None = None) -> list:
        or_default = f" (or remove the key to use the default {default})" if default else ""
        if not _is_list(value):
            self.fail(
                path,
                f"expected a list, found {_describe(value)}",
                f"write {path} as a list, e.g. {path}: {example}{or_default}",
            )
        if len(value) == 0:
            self.fail(
                path,
                "the list is empty",
                f"list at least one entry, e.g. {path}: {example}{or_default}",
            )
        return list(value)

    def integer(self, value: Any, path: str, fix: str) -> int:
        if not _is_int(value):
            if isinstance(value, float) and value.is_integer():
                fix = f"write {int(value)} (an integer, without the decimal point)"
            elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
                fix = f"write {int(value)} without quotes"
            self.fail(path, f"expected an integer, found {_describe(value)}", fix)
        return value

    def string(self, value: Any, path: str, fix: str) -> str:
        if not isinstance(value, str):
            self.fail(path, f"expected a string, found {_describe(value)}", fix)
        return value

    def _enum_list(self, value, key, *, example, default, normalize, check) -> tuple[str, ...]:
        """A non-empty list of strings; ``normalize`` maps to canonical form,
        ``check(item, canonical, path)`` raises for values that are not allowed."""
        items = self.seq(value, key, example=example, default=default)
        out: list[str] = []
        seen: dict[str, tuple[int, Any]] = {}
        for i, item in enumerate(items):
            path = f"{key}[{i}]"
            canonical = normalize(item, path)
            check(item, canonical, path)
            if canonical in seen:
                first, first_raw = seen[canonical]
                same = "" if item == first_raw else f" (both mean {canonical})"
                self.fail(
                    path,
                    f"{_show(item)} is a duplicate of {key}[{first}]{same}",
                    f"remove {path}",
                )
            seen[canonical] = (i, item)
            out.append(canonical)
        return tuple(out)
