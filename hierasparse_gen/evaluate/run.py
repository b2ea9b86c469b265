"""One evaluation: the dense reference once, then every setting through the sparse cache."""

from __future__ import annotations

import datetime
import platform

import torch

from ..cache import PREFILL_MODES
from ..errors import InputError
from ..policy import check_storage
from . import passkey as pk
from .quality import (POLICIES, Setting, cache_bytes_per_token, compare, dense_reference, enable_setting, nll_of,
                      sparse_decode)
from .report import Progress


def settings_grid(key_ratios, value_ratios, *, sink: int, window: int, prefill_modes=("attend_then_compress",),
                  policies=("prune_loss",), grid: str = "product",
                  storages=(("model", "model"),)) -> list[Setting]:
    """Settings of every (policy, prefill mode, storage, key ratio, value ratio): all ratio pairs
    ("product"), or each ratio alone with the other at 0 ("axes": the two curves of K and V).
    ``storages``: (key storage, value storage) pairs, each crossed with every ratio pair."""
    for name, ratios in (("key ratio", key_ratios), ("value ratio", value_ratios)):
        for r in ratios:
            if not 0.0 <= r <= 1.0:
                raise InputError(f"{name} {r:g} is outside [0, 1]. Fix: pass fractions of the eligible blocks "
                                 f"to store 2:4, e.g. 0,0.25,0.5,0.75,1")
    for p in policies:
        if p not in POLICIES:
            raise InputError(f"policy {p!r} is not known. Fix: use one of {', '.join(POLICIES)}")
    for ks, vs in storages:
        check_storage(ks, "key storage")
        check_storage(vs, "value storage")
    for m in prefill_modes:
        if m not in PREFILL_MODES:
            raise InputError(f"prefill mode {m!r} is not known. Fix: use one of {', '.join(PREFILL_MODES)}")
    if grid == "product":
        pairs = [(k, v) for k in key_ratios for v in value_ratios]
    elif grid == "axes":
        pairs = [(0.0, v) for v in value_ratios] + [(k, 0.0) for k in key_ratios]
    else:
        raise InputError(f"grid {grid!r} is not known. Fix: use product or axes")
    pairs = list(dict.fromkeys((float(k), float(v)) for k, v in pairs))
    storages = list(dict.fromkeys(tuple(s) for s in storages))
    return [Setting(k, v, sink, window, m, p, key_storage=ks, value_storage=vs)
            for p in policies for m in prefill_modes for ks, vs in storages for k, v in pairs]


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def evaluate(model, tokenizer, text_ids: list[int], settings: list[Setting], *, prefill: int, decode: int,
             backend: str = "simulate", lib=None, block_size: int | None = None,
             passkey_lengths=(), passkey_depths=(), passkey_trials: int = 1, filler_ids: list[int] | None = None,
             check_steps: int = 4, exact: bool = False, progress: bool = True, meta: dict | None = None,
             on_row=None) -> dict:
    """Run the dense reference and every setting; returns the result dict (what --json writes).
    ``exact``: no shortcut (see fastsim): every setting prefills through the model; same numbers,
    slower. ``on_row(result)``
    is called with the result so far after every setting (long runs keep what they finished)."""
    if prefill < 1 or decode < 1:
        raise InputError(f"prefill {prefill} and decode {decode} must be positive. Fix: e.g. --prefill 2048 "
                         f"--decode 128")
    if prefill + decode + 1 > len(text_ids):
        raise InputError(f"prefill {prefill} + decode {decode} needs {prefill + decode + 1} tokens, the text has "
                         f"{len(text_ids)}. Fix: pass a longer --text, or a smaller --prefill/--decode")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    longest = max([prefill + decode, *passkey_lengths])
    if max_pos and longest > max_pos:
        raise InputError(f"{longest} tokens exceed the model's {max_pos} positions. Fix: use a shorter --prefill "
                         f"or --passkey-lengths")
    device = next(model.parameters()).device
    ids = torch.tensor(text_ids[:prefill + decode + 1], device=device)
    targets = ids[prefill + 1:prefill + decode + 1]
    cases = pk.make_cases(tokenizer, filler_ids if filler_ids is not None else text_ids, list(passkey_lengths),
                          list(passkey_depths), passkey_trials) if passkey_lengths and passkey_depths else []

    bar = Progress((len(settings) + 1) * (decode + len(cases)), enabled=progress)
    bar.set("dense")
    reuse = not exact and any(s.prefill_mode == "attend_then_compress" for s in settings)
    ref = dense_reference(model, ids, prefill, decode, check_steps, keep_kv=reuse)
    bar.tick(decode)
    dense_logits = ref["logits"]
    dense_nll = nll_of(dense_logits, targets)
    dense_pk = []
    for c in cases:
        dense_pk.append(pk.answer_case(model, tokenizer, c, sparse=False))
        bar.tick()
    rows = []

    def result() -> dict:
        return {
            **(meta or {}),
            "backend": backend, "prefill": prefill, "decode": decode,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "torch": torch.__version__, "dtype": str(next(model.parameters()).dtype),
            "exact": exact,
            "dense_check": {"steps": ref["check_steps"], "max_abs_logit_diff": ref["check_max_abs"]},
            "dense": {"nll": dense_nll, "ppl": float(torch.tensor(dense_nll).exp()),
                      "bytes_per_token": _dense_bytes(model), "passkey": pk.accuracy(dense_pk),
                      "passkey_answers": dense_pk},
            "rows": rows,
        }

    for s in settings:
        bar.set(f"{s.policy} {s.label()} {s.prefill_mode}")
        enable_setting(model, s, backend=backend, lib=lib, block_size=block_size)
        kv = ref["kv"] if reuse and s.prefill_mode == "attend_then_compress" else None
        logits, cache, reused = sparse_decode(model, ids, prefill, decode, tick=bar.tick, prefill_kv=kv)
        row = {"policy": s.policy, "key_ratio": s.key_ratio, "value_ratio": s.value_ratio, "sink": s.sink,
               "window": s.window, "prefill_mode": s.prefill_mode, "prefill_reused": reused,
               "key_storage": s.key_storage, "value_storage": s.value_storage}
        row.update(compare(dense_logits, logits, targets))
        row["ppl_ratio"] = row["ppl"] / torch.tensor(dense_nll).exp().item()
        row.update(cache_bytes_per_token(cache))
        del cache, logits
        answers = []
        for c in cases:
            answers.append(pk.answer_case(model, tokenizer, c, sparse=True))
            bar.tick()
        row["passkey"] = pk.accuracy(answers)
        row["passkey_answers"] = answers
        rows.append(row)
        if on_row:
            on_row(result())
    bar.close()
    model.set_attn_implementation("sdpa")  # leave the model dense, as it came
    return result()


def _dense_bytes(model) -> float:
    """Dense 16-bit K and V bytes per token over all layers (what a dense cache holds)."""
    from ..hf import _check_model, _text_config
    config = _text_config(model)
    _, kv, head_dim = _check_model(config)
    return 2.0 * 2 * kv * head_dim * config.num_hidden_layers
