"""The transformers integration on the CPU, through the pure-torch simulation of the cache:
dense equivalence at ratio 0, pruning at ratio > 0, padding, generate(), and bad input."""

import pytest
import torch

from hf_models import run_steps, tiny_model, transformers
from hierasparse_gen import hf
from hierasparse_gen.cache import ratio_count

DynamicCache = transformers.DynamicCache


def _sparse(model, **kw):
    return hf.enable(model, backend="simulate", **{"key_ratio": 0.0, "value_ratio": 0.0, "sink": 64,
                                                   "window": 64, "block_size": 64, **kw})


def _tokens(B, n, seed):
    return torch.randint(0, 256, (B, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["attend_then_compress", "compress_then_attend", "balanced"])
@pytest.mark.parametrize("chunk", [None, 96])
def test_ratio_zero_matches_dense_attention(mode, chunk):
    dense, sparse = tiny_model(), _sparse(tiny_model(), prefill_mode=mode)
    prompt, new = _tokens(2, 300, 1), _tokens(2, 80, 2)
    want = run_steps(dense, prompt, new, DynamicCache(config=dense.config), chunk=chunk)
    cache = hf.make_cache(sparse, batch_size=2, max_cache_len=380)
    got = run_steps(sparse, prompt, new, cache, chunk=chunk)
    assert got.shape == want.shape == (2, 81, 256)
    assert (got - want).abs().max() < 1e-4
    store = cache.layers[0].store
    assert store.lengths == [380, 380] and not store.tiers("k").any()


def test_ratios_prune_by_the_policy_and_change_the_logits():
    dense, sparse = tiny_model(), _sparse(tiny_model(), key_ratio=1.0, value_ratio=0.5)
    prompt, new = _tokens(1, 640, 3), _tokens(1, 130, 4)
    cache = hf.make_cache(sparse, batch_size=1, max_cache_len=770)
    got = run_steps(sparse, prompt, new, cache)
    want = run_steps(dense, prompt, new, DynamicCache(config=dense.config))
    assert (got[:, 0] - want[:, 0]).abs().max() < 1e-4  # the prompt attended dense (attend-then-compress)
    assert (got[:, 1:] - want[:, 1:]).abs().max() > 1e-2  # decode reads the pruned cache
    for layer in cache.layers:
        s = layer.store
        elig = 770 // 64 - 1 - 1  # whole blocks minus sink and window
        assert s.n_eligible == [elig]
        assert (s.tiers("k").sum(-1) == ratio_count(1.0, elig)).all()
        assert (s.tiers("v").sum(-1) == ratio_count(0.5, elig)).all()


@pytest.mark.parametrize("chunk", [None, 100])
def test_left_padded_batch_matches_each_sequence_alone(chunk):
    # (compress-then-attend depends on where chunks end, so the padding is a whole chunk: the
    # padded sequence sees the same chunks as alone, after one chunk of nothing but padding)
    sparse = _sparse(tiny_model(), key_ratio=0.5, value_ratio=0.5, prefill_mode="compress_then_attend")
    a, b = _tokens(1, 300, 5), _tokens(1, 200, 6)
    new = _tokens(2, 70, 7)
    prompt = torch.cat([a, torch.cat([torch.zeros(1, 100, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, :100] = 0
    batch = run_steps(sparse, prompt, new, hf.make_cache(sparse, batch_size=2, max_cache_len=370),
                      attention_mask=mask, chunk=chunk)
    for i, p in enumerate((a, b)):
        alone = run_steps(sparse, p, new[i:i + 1], hf.make_cache(sparse, batch_size=1, max_cache_len=370), chunk=chunk)
        assert (batch[i] - alone[0]).abs().max() < 1e-4, f"sequence {i}"


def test_generate_builds_the_sparse_cache_itself():
    sparse = _sparse(tiny_model(), key_ratio=1.0, value_ratio=1.0)
    prompt = _tokens(2, 150, 8)
    out = sparse.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                          return_dict_in_generate=True)
    assert out.sequences.shape == (2, 162)
    cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.2x
    assert isinstance(cache, hf.HieraSparseCache)
    assert cache.layers[1].store.lengths == [161, 161]  # the last token is not fed back
    # chunked prefill through generate gives the same tokens
    again = sparse.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                            prefill_chunk_size=64)
    assert torch.equal(again, out.sequences)


def test_generate_keeps_the_model_signature_and_expands_for_return_sequences():
    sparse = _sparse(tiny_model(), key_ratio=1.0, value_ratio=1.0)
    seen = []
    hook = sparse.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    prompt = _tokens(2, 130, 12)
    out = sparse.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=True,
                          num_return_sequences=2)
    hook.remove()
    assert out.shape == (4, 133)
    assert seen == [1, 1, 1]  # logits_to_keep reached the model: the prompt's logits are not all computed


def test_a_4d_mask_is_refused_with_the_fix():
    sparse = _sparse(tiny_model(), key_ratio=1.0, value_ratio=1.0)
    x = _tokens(1, 40, 13)
    mask4d = torch.zeros(1, 1, 40, 40)
    with pytest.raises(ValueError, match="takes only a 2D padding mask"):
        with torch.no_grad():
            sparse(x, attention_mask=mask4d, past_key_values=hf.make_cache(sparse, batch_size=1, max_cache_len=40))


def test_no_cache_forward_is_dense_attention():
    dense, sparse = tiny_model(), _sparse(tiny_model(), key_ratio=1.0, value_ratio=1.0)
    x = _tokens(1, 90, 9)
    with torch.no_grad():
        assert torch.allclose(sparse(x, use_cache=False).logits, dense(x, use_cache=False).logits, atol=1e-5)


def test_no_cache_forward_masks_left_padding_like_dense():
    dense, sparse = tiny_model(), _sparse(tiny_model(), key_ratio=1.0, value_ratio=1.0)
    x = _tokens(2, 70, 11)
    mask = torch.ones_like(x)
    mask[1, :25] = 0
    with torch.no_grad():
        got = sparse(x, attention_mask=mask, use_cache=False).logits
        want = dense(x, attention_mask=mask, use_cache=False).logits
    assert torch.isfinite(got).all()
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1, 25:], want[1, 25:], atol=1e-5)


def test_bad_settings_name_the_fix():
    model = tiny_model()
    with pytest.raises(ValueError, match="prefill_mode 'fast' is not a prefill mode. Fix: use one of"):
        _sparse(model, prefill_mode="fast")
    with pytest.raises(ValueError, match=r"key_ratio: 1.2 is outside \[0, 1\]"):
        _sparse(model, key_ratio=1.2)
    with pytest.raises(ValueError, match="sink 32 and window 64 multiples of it"):
        _sparse(model, sink=32)
    with pytest.raises(ValueError, match="the kernels backend needs a library"):
        hf.enable(model, key_ratio=0.5, value_ratio=0.5)
    with pytest.raises(ValueError, match="not sparse-KV enabled"):
        hf.make_cache(tiny_model(), batch_size=1, max_cache_len=10)
    mistral = tiny_model("mistral")
    mistral.config.sliding_window = 128
    with pytest.raises(ValueError, match="sliding-window attention layers are not supported. Fix: set"):
        _sparse(mistral)


def test_library_without_the_model_shape_is_refused():
    class Variant:
        def __init__(self, kind, head_dim):
            self.kind, self.head_dim, self.group, self.dtype = kind, head_dim, 4, "float16"
            self.tier, self.block_size = ("mixed", "mixed"), 64

    class Lib:
        path = __import__("pathlib").Path("libhierasparse_llama3.so")
        manifest = {"spec": {"cache": {"block_size": 64, "sink": 64, "local_window": 256}}}
        variants = [Variant("decode", 128), Variant("prefill", 128)]

    model = tiny_model(head_dim=64).half()
    with pytest.raises(ValueError, match=r"no decode kernel for this model \(head_dim 64, GQA group 4, float16.*"
                                         r"Fix: add \{head_dim: 64"):
        hf.enable(model, Lib(), key_ratio=0.5, value_ratio=0.5)
    with pytest.raises(ValueError, match="dtype torch.float32 has no kernels"):
        hf.enable(tiny_model(), Lib(), key_ratio=0.5, value_ratio=0.5)
    hf.enable(tiny_model().half(), Lib(), key_ratio=0.5, value_ratio=0.5)  # the shape it has: accepted


def test_beam_search_is_refused():
    sparse = _sparse(tiny_model(), key_ratio=0.5, value_ratio=0.5)
    prompt = _tokens(1, 20, 10)
    with pytest.raises(NotImplementedError, match="num_beams=1"):
        sparse.generate(prompt, max_new_tokens=3, num_beams=2, do_sample=False)


def test_example_script_runs_on_a_saved_model(tmp_path):
    import importlib.util
    from pathlib import Path
    tiny_model().save_pretrained(tmp_path)
    path = Path(__file__).resolve().parent.parent / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("example_generate", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    common = ["--model", str(tmp_path), "--random-prompt", "150", "--new-tokens", "4", "--device", "cpu",
              "--dtype", "float32"]
    sparse = example.main(common + ["--backend", "simulate", "--key-ratio", "1", "--value-ratio", "0.5",
                                    "--sink", "64", "--window", "64", "--prefill-mode", "balanced",
                                    "--prefill-chunk", "64"])
    dense = example.main(common + ["--dense"])
    for r in (sparse, dense):
        assert r["prompt_tokens"] == 150 and r["new_tokens"] == 4 and r["ttft_s"] > 0
    with pytest.raises(SystemExit):
        example.main(common + ["--prefill-mode", "fastest"])


def test_fresh_prompt_attention_without_cuda_has_no_lse():
    """Off the GPU (and wherever cuDNN's attention refuses) the fresh-prompt attention is SDPA's, with no log-sum-exp
    for the fill: it then scores in two passes."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 40, 64, generator=g) for h in (4, 2, 2))
    out, lse = hf._dense_causal_lse(q, k, v, 0.125)
    assert lse is None and torch.equal(out, hf._dense_causal(q, k, v, 0.125))
