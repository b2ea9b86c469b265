"""The transformers integration on the GPU with the generated kernels: small random-weight
Llama / Mistral / Qwen3 models (head_dim 128, GQA group 4, fp16) against dense attention and
against the torch simulation of the same pruning; the decode step in a CUDA graph and under
torch.compile."""

import pytest
import torch

from helpers import kernel_masses
from hf_models import run_steps, tiny_model, transformers
from hierasparse_gen import hf
from hierasparse_gen.ops import capture_graph

pytestmark = pytest.mark.gpu
FP16 = dict(dtype=torch.float16, device="cuda")


def _tokens(B, n, seed):
    return torch.randint(0, 256, (B, n), generator=torch.Generator().manual_seed(seed)).cuda()


def _scale(x):
    return x.abs().max().item()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
@pytest.mark.parametrize("mode,chunk", [("attend_then_compress", None), ("compress_then_attend", 256),
                                        ("balanced", 200)])
def test_ratio_zero_matches_dense_attention(llama3, family, mode, chunk):
    dense = tiny_model(family, **FP16)
    sparse = hf.enable(tiny_model(family, **FP16), llama3, key_ratio=0.0, value_ratio=0.0, prefill_mode=mode,
                       cuda_graph=False)
    prompt, new = _tokens(2, 700, 1), _tokens(2, 60, 2)
    want = run_steps(dense, prompt, new, transformers.DynamicCache(config=dense.config), chunk=chunk)
    got = run_steps(sparse, prompt, new, hf.make_cache(sparse, batch_size=2, max_cache_len=760), chunk=chunk)
    err = (got - want).abs().max().item()
    print(f"{family} {mode}: max |logit diff| {err:.2e} of {_scale(want):.2f}")
    assert err < 2e-3 * _scale(want) + 1e-2


@pytest.mark.parametrize("mode,chunk", [("attend_then_compress", 256), ("compress_then_attend", 256),
                                        ("balanced", None)])
@pytest.mark.parametrize("ratios", [(0.5, 1.0), (1.0, 1.0)])
def test_kernels_match_the_simulation_of_the_same_pruning(llama3, monkeypatch, mode, chunk, ratios):
    # one layer: past it, fp16 rounding differences in a layer's input can flip which 2 of 4
    # near-equal values 2:4 keeps, and the comparison would measure that instead of the kernels
    kernel_masses(monkeypatch, llama3)
    settings = dict(key_ratio=ratios[0], value_ratio=ratios[1], sink=64, window=64, prefill_mode=mode)
    model = tiny_model("llama", layers=1, **FP16)
    prompt, new = _tokens(2, 600, 3), _tokens(2, 150, 4)  # decode crosses two block boundaries
    hf.enable(model, backend="simulate", **settings)
    sim_cache = hf.make_cache(model, batch_size=2, max_cache_len=750)
    want = run_steps(model, prompt, new, sim_cache, chunk=chunk)
    hf.enable(model, llama3, **settings)  # decode steps replay a CUDA graph (the default)
    cache = hf.make_cache(model, batch_size=2, max_cache_len=750)
    got = run_steps(model, prompt, new, cache, chunk=chunk)
    for layer, sim in zip(cache.layers, sim_cache.layers):
        for name in ("k", "v"):
            assert torch.equal(layer.store.tiers(name), sim.store.tiers(name)), f"layer {layer.layer_idx} {name}"
        assert layer.store.lengths == sim.store.lengths == [750, 750]
    dense = tiny_model("llama", layers=1, **FP16)
    full = torch.cat([prompt, new], 1)
    with torch.no_grad():
        dense_logits = dense(full).logits[:, 599:].float()
    err, moved = (got - want).abs().max().item(), (want - dense_logits).abs().max().item()
    print(f"{mode} {ratios}: kernels vs simulation {err:.2e}; pruning moved the logits by {moved:.2e}")
    assert err < 2e-3 * _scale(want) + 1e-2
    assert moved > 10 * err  # the comparison can tell pruned from dense


def test_generate_with_kernels_single_and_chunked_prefill(llama3):
    model = hf.enable(tiny_model("qwen3", **FP16), llama3, key_ratio=1.0, value_ratio=1.0, sink=64, window=64)
    prompt = _tokens(2, 500, 5)
    for chunk in (None, 128):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                             prefill_chunk_size=chunk, return_dict_in_generate=True)
        assert out.sequences.shape == (2, 540)
        store = (getattr(out, "cache", None) or out.past_key_values).layers[0].store
        assert store.lengths == [539, 539] and store.tiers("k").sum().item() > 0


def _prefilled(llama3, n_new: int, seed: int):
    """A tiny Llama on the sparse cache (all 2:4, eager decode) holding a 300-token prompt, and
    n_new more tokens to feed it."""
    model = hf.enable(tiny_model("llama", **FP16), llama3, key_ratio=1.0, value_ratio=1.0, sink=64, window=64,
                      cuda_graph=False)
    prompt, new = _tokens(1, 300, seed), _tokens(1, n_new, seed + 1)
    cache = hf.make_cache(model, batch_size=1, max_cache_len=320)
    run_steps(model, prompt, new[:, :0], cache)
    return model, cache, new


def test_decode_step_captured_in_a_cuda_graph(llama3):
    """A whole-model decode step captured once and replayed 130 times (across block starts
    and 2:4 flushes) gives the logits of the same steps run eagerly on a second cache."""
    model = hf.enable(tiny_model("llama", **FP16), llama3, key_ratio=0.5, value_ratio=1.0, sink=64, window=64,
                      cuda_graph=False)
    prompt, new = _tokens(2, 600, 6), _tokens(2, 132, 7)
    graphed, eager = (hf.make_cache(model, batch_size=2, max_cache_len=732) for _ in range(2))
    run_steps(model, prompt, new[:, :0], graphed)
    run_steps(model, prompt, new[:, :0], eager)
    ids = new[:, :1].clone()
    pos = torch.full((2, 1), 600, dtype=torch.long, device="cuda")

    def step():
        with torch.no_grad():
            return model(input_ids=ids, position_ids=pos, past_key_values=graphed, use_cache=True).logits[:, -1]

    graph, _, logits = capture_graph(step)  # the warm-up is step 0
    with torch.no_grad():
        model(input_ids=new[:, :1], position_ids=pos.clone(), past_key_values=eager, use_cache=True)
    for i in range(1, 131):
        ids.copy_(new[:, i:i + 1])
        pos.fill_(600 + i)
        graph.replay()
        graphed.advance(1)
        with torch.no_grad():
            want = model(input_ids=new[:, i:i + 1], position_ids=pos.clone(), past_key_values=eager,
                         use_cache=True).logits[:, -1]
        assert torch.equal(logits, want), f"step {i}"
    for a, b in zip(graphed.layers, eager.layers):
        a.store.sync()
        assert a.store.lengths == b.store.lengths == [731, 731]
        assert torch.equal(a.store.k.table, b.store.k.table) and torch.equal(a.store.v.table, b.store.v.table)
    assert graphed.get_seq_length() == eager.get_seq_length() == 731


def test_compiled_decode_step_keeps_the_attention_ops_in_the_graph(llama3):
    model, cache, new = _prefilled(llama3, 3, seed=8)

    def attention_step(module, q, k, v):
        return hf.hierasparse_attention(module, q, k, v, None, scaling=module.scaling)

    torch._dynamo.reset()
    layer = cache.layers[0]
    module = model.model.layers[0].self_attn
    q = torch.randn(1, 8, 1, 128, **FP16)
    kv = torch.randn(1, 2, 1, 128, **FP16)
    hf._PENDING[0] = layer
    explanation = torch._dynamo.explain(attention_step)(module, q, kv, kv)
    print(explanation)
    assert explanation.graph_break_count == 0
    ops = [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("cache_append" in o for o in ops) and any("decode_table" in o for o in ops), ops


def test_graphed_decoder_greedy_tokens_equal_eager_ones(llama3):
    model = hf.enable(tiny_model("mistral", **FP16), llama3, key_ratio=1.0, value_ratio=0.5, sink=64, window=64,
                      cuda_graph=False)
    prompt = _tokens(1, 400, 10)
    runs = []
    for graphed in (False, True):
        cache = hf.make_cache(model, batch_size=1, max_cache_len=480)
        with torch.no_grad():
            logits = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[:, -1]
        tok, pos, toks = logits.argmax(-1, keepdim=True), torch.full((1, 1), 400, device="cuda"), []
        dec = hf.GraphedDecoder(model, cache) if graphed else None
        for _ in range(80):  # crosses a block start and a 2:4 flush
            toks.append(tok)
            with torch.no_grad():
                logits = dec.step(tok, pos) if graphed else model(
                    input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
            tok, pos = logits.argmax(-1, keepdim=True), pos + 1
        runs.append(torch.cat(toks, 1))
        assert cache.get_seq_length() == 480
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(hf.CacheFullError, match="capacity; nothing was written"):
        dec.step(tok, pos)


def test_compiled_model_decode_step_breaks_nowhere_in_the_sparse_attention(llama3):
    """Dynamo over a whole-model decode step: whatever transformers itself breaks on, no graph
    break comes from this project's code (cache update, attention function, custom ops)."""
    model, cache, new = _prefilled(llama3, 1, seed=11)
    torch._dynamo.reset()
    pos = torch.full((1, 1), 300, device="cuda")
    with torch.no_grad():
        explanation = torch._dynamo.explain(model.forward)(input_ids=new, position_ids=pos, past_key_values=cache,
                                                            use_cache=True)
    ours = [r for r in explanation.break_reasons
            if any("hierasparse_gen" in f.filename for f in r.user_stack)]
    print(f"{explanation.graph_break_count} graph breaks; reasons: {[r.reason[:80] for r in explanation.break_reasons]}")
    assert not ours, ours[0].reason
    ops = [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("cache_append" in o for o in ops) == 2 and sum("decode_table" in o for o in ops) == 2


def test_generate_with_graphed_decode_equals_eager_generate(llama3):
    model = tiny_model("qwen3", **FP16)
    prompt = _tokens(2, 450, 13)
    mask = torch.ones_like(prompt)
    mask[1, :50] = 0  # left padding: positions come from the mask, tokens enter only their sequence
    runs = []
    for graph in (False, True):
        hf.enable(model, llama3, key_ratio=1.0, value_ratio=1.0, sink=64, window=64, cuda_graph=graph)
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=90, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        assert (cache.decoder is not None) == graph
        runs.append(out)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].logits, runs[1].logits):
        assert torch.equal(a, b)


def test_graph_replays_after_a_sync_keep_the_host_copy_current(llama3):
    """Each replay marks the host bookkeeping stale, also after a sync cleared the flag."""
    model, cache, new = _prefilled(llama3, 12, seed=14)
    dec = hf.GraphedDecoder(model, cache)
    for i in range(12):
        dec.step(new[:, i:i + 1], torch.full((1, 1), 300 + i, device="cuda"))
        if i in (4, 11):
            assert all(layer.store.lengths == [301 + i] for layer in cache.layers)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fresh_prompt_attention_returns_the_rows_log_sum_exp(dtype):
    """enable()'s attend_then_compress prefill of a fresh prompt: cuDNN's attention on the layout a transformers
    layer passes ([B, L, H, D] transposed, GQA) returns each row's log-sum-exp, which the cache's scoring reads:
    out and lse against float64."""
    B, L, HQ, HKV, D = 2, 600, 8, 2, 128
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(B, L, h, D, generator=g, device="cuda").to(dtype).transpose(1, 2) * s
               for h, s in ((HQ, 2.0), (HKV, 1.0), (HKV, 1.0)))
    out, lse = hf._dense_causal_lse(q, k, v, 0.1)
    assert lse is not None and lse.shape == (B, HQ, L) and lse.dtype == torch.float32
    kk, vv = (x.double().repeat_interleave(HQ // HKV, 1) for x in (k, v))
    s = (q.double() @ kk.transpose(-1, -2)) * 0.1
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ vv, rtol=0, atol=2e-2 if dtype == torch.bfloat16
                               else 3e-3)
