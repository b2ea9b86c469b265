"""Prototype (not in the package): attention-aware 2:4 block choice, on the eval protocol.

A block's score is the attention mass that the prompt's last ``--observe`` queries put on it,
per KV head (summed over the group's query heads). The blocks with the least mass become 2:4
(same count per head as the ratio gives today); the cache's prune-loss choice is replaced after
the prefill, before any decode step. Decode-time flushes keep the cache's own count rule.
Scores come from the dense model (queries captured from the prefill, keys from its cache).

    PYTHONPATH=. python experiments/quality/attention_aware.py --model smollm2 --prefill 2048 \\
        --decode 128 --pairs 0:0.5,0:0.75,0.5:0 --policies prune_loss,attention
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hierasparse_gen import hf
from hierasparse_gen.evaluate.fastsim import prefill_from
from hierasparse_gen.evaluate.load import load_model, read_text
from hierasparse_gen.evaluate.quality import (Setting, _forward, cache_bytes_per_token, compare, dense_cache,
                                              enable_setting, nll_of)


def capture_queries(model, observe: int):
    """Hooks that keep the last ``observe`` post-RoPE queries of each attention layer's next call."""
    got, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn

        def hook(module, args, kwargs, i=i):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            B, L, _ = h.shape
            D = module.head_dim
            q = module.q_proj(h[:, -observe:]).view(B, min(observe, L), -1, D).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos[:, -observe:], sin[:, -observe:])
            got[i] = (q.detach(), module.scaling)

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    return got, handles


def block_mass(q, scaling, k, block: int) -> torch.Tensor:
    """[Hkv, blocks]: attention mass of queries q [1, Hq, W, D] (the prompt's last W) on keys k
    [1, Hkv, P, D], causal, summed over each KV head's group and the W queries."""
    _, Hq, W, D = q.shape
    Hkv, P = k.shape[1], k.shape[2]
    qd = q.double().view(Hkv, Hq // Hkv, W, D)
    s = torch.einsum("hgwd,hld->hgwl", qd, k[0].double()) * scaling
    pos = torch.arange(P - W, P).view(W, 1)
    s = s.masked_fill(torch.arange(P).view(1, P) > pos, float("-inf"))
    p = torch.softmax(s, -1).sum((1, 2))  # [Hkv, P]
    n = P // block
    return p[:, :n * block].view(Hkv, n, block).sum(-1)


def retier(cache, masses) -> None:
    """Replace each layer's prune-loss choice by the least-attended eligible blocks (same counts)."""
    for layer, mass in zip(cache.layers, masses):
        st = layer.store
        sb, elig = st.sink_blocks, st.n_eligible[0]
        for name in "kv":
            n = st.n_sparse[name][0]
            flags = torch.zeros_like(st.sparse[name])
            if n:
                chosen = torch.argsort(mass[:, sb:sb + elig], dim=-1, stable=True)[:, :n] + sb
                flags[0].scatter_(1, chosen, True)
            st.set_tiers(name, flags)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text")
    ap.add_argument("--tokenizer", default="auto")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--observe", type=int, default=64)
    ap.add_argument("--pairs", default="0:0.5", help="key:value ratio pairs")
    ap.add_argument("--policies", default="prune_loss,attention")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    loaded = load_model(args.model, dtype=torch.float32, device="cpu", tokenizer=args.tokenizer)
    model, tok = loaded.model, loaded.tokenizer
    text, source = read_text(args.text)
    P, T = args.prefill, args.decode
    ids = torch.tensor(tok.encode(text)[:P + T + 1])
    targets = ids[P + 1:]
    t0 = time.time()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        dense = dense_cache(model)
        got, handles = capture_queries(model, args.observe)
        _forward(model, ids[:P], 0, dense, keep=1)
        for h in handles:
            h.remove()
        kv = [(layer.keys.clone(), layer.values.clone()) for layer in dense.layers]
        ref = _forward(model, ids[P:P + T], P, dense)
        masses = [block_mass(got[i][0], got[i][1], kv[i][0], 64) for i in range(len(kv))]
    dense_nll = nll_of(ref, targets)
    print(f"dense: ppl {math.exp(dense_nll):.4f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    rows = []
    for pair in args.pairs.split(","):
        kr, vr = (float(x) for x in pair.split(":"))
        for policy in args.policies.split(","):
            t0 = time.time()
            enable_setting(model, Setting(kr, vr, args.sink, args.window), backend="simulate", lib=None,
                           block_size=64)
            cache = hf.make_cache(model, batch_size=1, max_cache_len=P + T)
            assert prefill_from(cache, kv)
            if policy == "attention":
                retier(cache, masses)
            out = []
            with torch.no_grad():
                for i in range(T):
                    out.append(_forward(model, ids[P + i:P + i + 1], P + i, cache)[-1])
            row = {"policy": policy, "key_ratio": kr, "value_ratio": vr, **compare(ref, torch.stack(out), targets),
                   **cache_bytes_per_token(cache)}
            row["ppl_ratio"] = row["ppl"] / math.exp(dense_nll)
            rows.append(row)
            print(f"{policy:<11} k{kr:g} v{vr:g}: ppl {row['ppl']:.4f} ({row['ppl_ratio']:.4f}x) KL {row['kl']:.5f} "
                  f"top1 {row['top1']:.3f} B/token {row['bytes_per_token']:.0f} ({time.time() - t0:.0f}s)", flush=True)
            model.set_attn_implementation("sdpa")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": loaded.name, "text": source, "prefill": P, "decode": T, "observe": args.observe,
                       "sink": args.sink, "window": args.window, "dense_ppl": math.exp(dense_nll), "rows": rows},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
