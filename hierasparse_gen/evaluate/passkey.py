"""Passkey retrieval: a 5-digit key planted at a depth of long filler text, asked for at the
end, answered by greedy generation. Prompts are built from token ids so their length is exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .. import hf
from ..errors import InputError
from .quality import _forward, dense_cache

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Case:
    length: int
    depth: float
    trial: int
    key: str
    ids: torch.Tensor   # the prompt, exactly ``length`` tokens
    new_tokens: int     # how many tokens to generate


def make_cases(tokenizer, filler: list[int], lengths: list[int], depths: list[float], trials: int,
               seed: int = 0) -> list[Case]:
    """One prompt per (length, depth, trial); the key differs per trial (same keys for every setting)."""
    intro = tokenizer.encode(INTRO, first=True)
    question = tokenizer.encode(QUESTION, first=False)
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                key = str(rng.randint(10000, 99999))
                needle = tokenizer.encode(NEEDLE.format(key=key), first=False)
                n_fill = length - len(intro) - len(needle) - len(question)
                if n_fill < 0:
                    raise InputError(f"passkey length {length} is shorter than the prompt's fixed parts "
                                     f"({length - n_fill} tokens). Fix: use passkey lengths of at least "
                                     f"{length - n_fill + 64}")
                if n_fill > len(filler):
                    raise InputError(f"passkey length {length} needs {n_fill} tokens of filler, the text has "
                                     f"{len(filler)}. Fix: pass a longer --text or shorter --passkey-lengths")
                at = round(depth * n_fill)
                ids = intro + filler[:at] + needle + filler[at:n_fill] + question
                answer = tokenizer.encode(" " + key, first=False)
                cases.append(Case(length, depth, trial, key, torch.tensor(ids), len(answer) + 3))
    return cases


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int, cache) -> list[int]:
    """Greedy continuation of ``ids`` (1-D), ``new_tokens`` tokens, through ``cache``."""
    logits = _forward(model, ids, 0, cache, keep=1)
    out = [int(logits[-1].argmax())]
    pos = ids.shape[0]
    while len(out) < new_tokens:
        nxt = torch.tensor([out[-1]], device=ids.device)
        out.append(int(_forward(model, nxt, pos, cache)[-1].argmax()))
        pos += 1
    return out


def answer_case(model, tokenizer, case: Case, *, sparse: bool) -> dict:
    ids = case.ids.to(next(model.parameters()).device)
    if sparse:
        cache = hf.make_cache(model, batch_size=1, max_cache_len=case.length + case.new_tokens)
    else:
        cache = dense_cache(model)
    text = tokenizer.decode(greedy(model, ids, case.new_tokens, cache))
    return {"length": case.length, "depth": case.depth, "trial": case.trial, "key": case.key,
            "answer": text, "correct": case.key in text}


def accuracy(results: list[dict]) -> list[dict]:
    """Accuracy per (length, depth) over trials, in the order of first appearance."""
    groups: dict[tuple, list[bool]] = {}
    for r in results:
        groups.setdefault((r["length"], r["depth"]), []).append(r["correct"])
    return [{"length": length, "depth": depth, "accuracy": sum(v) / len(v), "trials": len(v)}
            for (length, depth), v in groups.items()]
