"""GPU tests of the hierarchical cache: prefill selection and packing, decode appends and
flushes, mixed-tier decode against the float64 reference on exactly what the cache holds."""

import pytest
import torch

from hierasparse_gen import format as fmt
from hierasparse_gen.cache import CacheFullError, HieraCache, ratio_count
from hierasparse_gen.errors import InputError
from hierasparse_gen.ops import capture_graph
from helpers import check_against_reference, kernel_masses, rand as _rand

pytestmark = pytest.mark.gpu
D, HKV, HQ = 128, 8, 32


@pytest.fixture(scope="module")
def lib(llama3):
    return llama3


class Model:
    """The test's own account of what the cache must hold: the tokens it was given, pruned 2:4
    wherever the cache's table says the block is 2:4."""

    def __init__(self, cache, total, seed, dtype=torch.float16):
        S = cache.block
        cap = -(-total // S) * S
        self.k = _rand(cache.batch, HKV, cap, D, seed=seed, dtype=dtype)
        self.v = _rand(cache.batch, HKV, cap, D, seed=seed + 1, dtype=dtype)
        self.pk, self.pv = fmt.prune_k(self.k), fmt.prune_v(self.v)
        self.cache = cache

    def expected(self):
        c = self.cache
        L = max(c.lengths)
        out = []
        for name, x, px in (("k", self.k, self.pk), ("v", self.v, self.pv)):
            sparse = c.tiers(name).repeat_interleave(c.block, -1)[..., :L].unsqueeze(-1)
            e = torch.where(sparse, px[:, :, :L], x[:, :, :L])
            for b, n in enumerate(c.lengths):
                e[b, :, n:] = 0
            out.append(e)
        return out


def _check_attend(cache, model, seed):
    q = _rand(cache.batch, HQ, D, seed=seed, dtype=cache.dtype)
    out, lse = cache.attend(q)
    ek, ev = model.expected()
    return check_against_reference(out, lse, q, ek, ev, torch.tensor(cache.lengths))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_selects_lowest_loss_blocks_per_head(lib, poison, dtype):
    lengths = [1000, 200, 4133]  # 200 < sink + window: all dense (the paper code crashed)
    cache = HieraCache(lib, batch=3, num_kv_heads=HKV, head_dim=D, max_seq_len=5000, key_ratio=0.5,
                       value_ratio=0.75, dtype=dtype)
    model = Model(cache, 5000, seed=1, dtype=dtype)
    L = max(lengths)
    cache.prefill(model.k[:, :, :L], model.v[:, :, :L], lengths)
    assert cache.lengths == lengths
    for b, n in enumerate(lengths):
        full = n // 64
        elig = max(0, full - 1 - 4)
        assert cache.n_eligible[b] == elig
        for name, ratio, x in (("k", 0.5, model.k), ("v", 0.75, model.v)):
            tiers = cache.tiers(name)[b]                    # [H, max_blocks]
            n_s = ratio_count(ratio, elig)
            assert (tiers.sum(1) == n_s).all()
            assert not tiers[:, :1].any() and not tiers[:, 1 + elig:].any()  # sink and window dense
            if n_s:
                loss = fmt.block_prune_loss(x[b:b + 1, :, :n], name, 64)[0, :, 1:1 + elig]
                gpu = cache._score(x[b:b + 1, :, :n], name)[0, :, 1:1 + elig]
                assert torch.allclose(gpu, loss, rtol=1e-4, atol=1e-2)
                chosen = tiers[:, 1:1 + elig]
                # every chosen block's loss is <= every unchosen block's loss, per head
                worst_chosen = torch.where(chosen, loss, -1.0).amax(1)
                best_unchosen = torch.where(chosen, float("inf"), loss).amin(1)
                assert (worst_chosen <= best_unchosen + 1e-3).all()
    k_tiers = cache.tiers("k")[2]
    assert not (k_tiers == k_tiers[0]).all(), "heads should make different block choices"
    ek, ev = model.expected()
    hk, hv = cache.to_dense()
    assert torch.equal(hk, ek) and torch.equal(hv, ev)
    _check_attend(cache, model, seed=5)


@pytest.mark.parametrize("selection,key_channels,value_tokens", [
    ("attention", "magnitude", "magnitude"), ("expected_error", "magnitude", "magnitude"),
    ("expected_error", "query", "magnitude"), ("prune_loss", "query", "magnitude"),
    ("attention", "query", "attention"), ("expected_error", "magnitude", "attention"),
    ("expected_error", "query", "attention")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_selection_by_the_prompts_queries(lib, poison, monkeypatch, selection, key_channels, value_tokens,
                                                  dtype):
    """The GPU path of the query-aware selections (scores on the device, the select kernel; K's
    channel weights in the fill and append kernels, V's token weights in the fill kernel and, for the
    prompt's window blocks, in the append kernel) makes the simulation's choices, per head, for
    sequences of different lengths, and stores what it stores: after the prompt, after a later chunk
    (its flushed blocks through the fill kernel), after decode flushes, and after decode flushes right
    after the prompt."""
    from hierasparse_gen.simulate import SimulatedCache
    kernel_masses(monkeypatch, lib)
    lengths = [3000, 1111]
    kw = dict(batch=2, num_kv_heads=HKV, head_dim=D, max_seq_len=3600, key_ratio=0.5, value_ratio=0.75, dtype=dtype,
              selection=selection, key_channels=key_channels, observe=48, value_tokens=value_tokens)
    cache, sim = HieraCache(lib, **kw), SimulatedCache(device="cuda", **kw)
    k, v = (_rand(2, HKV, 3600, D, seed=s, dtype=dtype) for s in (31, 32))
    q = _rand(2, HQ, 3000, D, seed=33, dtype=dtype) * 2
    q[..., 0::4] *= 8  # queries lean on some channels, so the weighted K choice differs from magnitudes

    def same():
        for name in "kv":
            assert torch.equal(cache.tiers(name), sim.tiers(name)), name
        (ck, cv), (sk, sv) = cache.to_dense(), sim.to_dense()
        assert torch.equal(ck, sk) and torch.equal(cv, sv)

    cache.prefill(k[:, :, :3000], v[:, :, :3000], lengths, select_q=q)
    sim.prefill(k[:, :, :3000], v[:, :, :3000], lengths, select_q=q)
    same()
    after_prompt, after_prompt_v = (x.clone() for x in cache.to_dense())
    sim_tiers_v = cache.tiers("v").clone()
    chunk = [300, 300]  # a later chunk: blocks leave the window inside it
    kc, vc = (torch.stack([x[b, :, n:n + 300] for b, n in enumerate(lengths)]) for x in (k, v))
    cache.prefill(kc, vc, chunk)
    sim.prefill(kc, vc, chunk)
    same()
    for _ in range(70):  # decode steps across a flush
        pos = cache.lengths
        cache.append(k[torch.arange(2), :, pos], v[torch.arange(2), :, pos])
        sim.append(k[torch.arange(2), :, pos], v[torch.arange(2), :, pos])
    same()
    # decode right after the prompt: the prompt's window blocks leave the window in the append kernel (V with
    # the prompt's token weights)
    cache.reset()
    sim = SimulatedCache(device="cuda", **kw)
    cache.prefill(k[:, :, :3000], v[:, :, :3000], lengths, select_q=q)
    sim.prefill(k[:, :, :3000], v[:, :, :3000], lengths, select_q=q)
    tiers_at_prompt = cache.tiers("v").clone()
    for _ in range(140):
        pos = cache.lengths
        cache.append(k[torch.arange(2), :, pos], v[torch.arange(2), :, pos])
        sim.append(k[torch.arange(2), :, pos], v[torch.arange(2), :, pos])
    same()
    if selection == "attention":  # re-tiering by mass: some head compressed a block held since the prompt
        held = [(cache.tiers("v")[b, :, :n // cache.block - cache.window_blocks] &
                 ~tiers_at_prompt[b, :, :n // cache.block - cache.window_blocks]).any() for b, n in enumerate(lengths)]
        assert any(bool(h) for h in held)
    other = HieraCache(lib, **{**kw, "selection": "prune_loss", "key_channels": "magnitude",
                               "value_tokens": "magnitude"})
    other.prefill(k[:, :, :3000], v[:, :, :3000], lengths, select_q=q)
    assert not torch.equal(other.to_dense()[0], after_prompt), "the policy should change K"
    if value_tokens == "attention":  # the same V tiers, other kept tokens
        same_tiers = HieraCache(lib, **{**kw, "value_tokens": "magnitude"})
        same_tiers.prefill(k[:, :, :3000], v[:, :, :3000], lengths, select_q=q)
        if selection == "attention":  # (the error scores weigh V's tokens too)
            assert torch.equal(same_tiers.tiers("v"), sim_tiers_v)
        assert not torch.equal(same_tiers.to_dense()[1], after_prompt_v), "token weights should change V"


def test_prefill_given_the_prompts_log_sum_exp(lib, poison):
    """select_lse (the window rows' natural log-sum-exp, as cuDNN's attention returns it) reaches the scoring kernel
    for every sequence, one length each or not: the re-tiering scores it writes equal those of scoring in two passes
    to float32 rounding, and one shifted by 1 scales them by 1/e; bad lse is refused with its fix."""
    lengths = [3000, 1111]
    kw = dict(batch=2, num_kv_heads=HKV, head_dim=D, max_seq_len=3600, key_ratio=0.5, value_ratio=0.5)
    k, v = (_rand(2, HKV, 3000, D, seed=s) for s in (41, 42))
    q = _rand(2, HQ, 3000, D, seed=43) * 2
    lse = torch.full((2, HQ, 3000), float("nan"), device="cuda")  # rows the scoring must not read: NaN
    for b, n in enumerate(lengths):
        kk = k[b, :, :n].double().repeat_interleave(HQ // HKV, 0)
        s = (q[b, :, n - 64:n].double() @ kk.transpose(-1, -2)) * D ** -0.5
        late = torch.arange(n, device="cuda").view(1, n) > torch.arange(n - 64, n, device="cuda").view(64, 1)
        lse[b, :, n - 64:n] = torch.logsumexp(s.masked_fill(late, float("-inf")), -1).float()
    scores = []
    for given in (None, lse, lse + 1):
        cache = HieraCache(lib, **kw)
        cache.prefill(k, v, lengths, select_q=q, select_lse=given)
        scores.append(cache.block_mass.clone())
    finite = torch.isfinite(scores[0])
    assert finite.any() and torch.equal(finite, torch.isfinite(scores[1]))
    torch.testing.assert_close(scores[1][finite], scores[0][finite], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores[2][finite], scores[0][finite] * torch.e ** -1, rtol=1e-4, atol=1e-7)
    cache = HieraCache(lib, **kw)
    for bad, why in ((lse.double(), "float64"), (lse[:, :, :2999], "a row short"), (lse[:1], "one sequence")):
        with pytest.raises(InputError, match="select_lse: .* Fix: pass float32"):
            cache.prefill(k, v, lengths, select_q=q, select_lse=bad)
    with pytest.raises(InputError, match="select_lse: given without the queries"):
        cache.prefill(k, v, lengths, select_lse=lse)
    assert cache.lengths == [0, 0]  # nothing written


@pytest.mark.parametrize("ratios", [(0.5, 0.25), (0.0, 1.0), (1.0, 0.0)])
def test_decode_with_flushes_matches_reference_every_step(lib, ratios):
    kr, vr = ratios
    steps = 2100 if ratios == (0.5, 0.25) else 400
    cache = HieraCache(lib, batch=2, num_kv_heads=HKV, head_dim=D, max_seq_len=3000, key_ratio=kr, value_ratio=vr)
    model = Model(cache, 3000, seed=7)
    start = [100, 700]
    cache.prefill(model.k[:, :, :700], model.v[:, :, :700], start)
    worst = 0.0
    for step in range(steps):
        pos = cache.lengths
        cache.append(model.k[torch.arange(2), :, pos], model.v[torch.arange(2), :, pos])
        worst = max(worst, _check_attend(cache, model, seed=1000 + step))
        if step % 500 == 0 or step == steps - 1:
            ek, ev = model.expected()
            hk, hv = cache.to_dense()
            assert torch.equal(hk, ek) and torch.equal(hv, ev), f"cache content wrong after step {step}"
    for b in range(2):
        elig = max(0, cache.lengths[b] // 64 - 1 - 4)
        assert cache.n_eligible[b] == elig > 0
        # decode-time flushes honour each ratio (the paper code always used ratio 1)
        assert cache.k.n_sparse[b] == ratio_count(kr, elig)
        assert cache.v.n_sparse[b] == ratio_count(vr, elig)
        assert (cache.tiers("k")[b].sum(1) == ratio_count(kr, elig)).all()
    print(f"ratios {ratios}: worst max error over {steps} steps {worst:.2e}")


def test_full_cache_raises_before_writing(lib):
    cache = HieraCache(lib, batch=2, num_kv_heads=HKV, head_dim=D, max_seq_len=128, key_ratio=1.0, value_ratio=1.0)
    model = Model(cache, 128, seed=3)
    cache.prefill(model.k[:, :, :127], model.v[:, :, :127], [120, 127])
    cache.append(model.k[:, :, 120], model.v[:, :, 120])  # lengths 121, 128
    before = [t.clone() for t in cache.to_dense()]
    with pytest.raises(CacheFullError, match=r"sequences \[1\] hold 128 tokens, the cache capacity; nothing was written"):
        cache.append(model.k[:, :, 121], model.v[:, :, 121])
    assert cache.lengths == [121, 128]
    after = cache.to_dense()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    big = _rand(1, HKV, 129, D, seed=4)
    small = HieraCache(lib, batch=1, num_kv_heads=HKV, head_dim=D, max_seq_len=128, key_ratio=0, value_ratio=0)
    with pytest.raises(CacheFullError, match="sequences would hold up to 129 tokens, more than the cache capacity 128; "
                                             "nothing was written"):
        small.prefill(big, big)


def test_bad_inputs(lib):
    cache = HieraCache(lib, batch=2, num_kv_heads=HKV, head_dim=D, max_seq_len=256, key_ratio=0.5, value_ratio=0.5)
    x = _rand(2, HKV, D, seed=1)
    with pytest.raises(ValueError, match=r"k: shape \(2, 4, 128\) does not match the cache. Fix: pass \[2, 8, 128\]"):
        cache.append(x[:, :4], x)
    with pytest.raises(ValueError, match="v: dtype torch.bfloat16 but the cache holds torch.float16"):
        cache.append(x, x.bfloat16())
    with pytest.raises(ValueError, match="k: expected a CUDA tensor"):
        cache.append(x.cpu(), x)
    with pytest.raises(ValueError, match="key_ratio: 1.5 is outside"):
        HieraCache(lib, batch=1, num_kv_heads=HKV, head_dim=D, max_seq_len=64, key_ratio=1.5, value_ratio=0)
    assert cache.lengths == [0, 0]
    q = _rand(2, 30, D, seed=2)
    with pytest.raises(ValueError, match="q: shape"):
        cache.attend(q)


def test_nbytes_matches_the_byte_model(lib):
    cache = HieraCache(lib, batch=1, num_kv_heads=HKV, head_dim=D, max_seq_len=8192, key_ratio=0.5, value_ratio=1.0)
    model = Model(cache, 8192, seed=9)
    cache.prefill(model.k, model.v)
    nb = cache.nbytes()
    blocks = 8192 // 64
    for name, ratio in (("k", 0.5), ("v", 1.0)):
        n_s = ratio_count(ratio, blocks - 5)
        S = n_s / blocks
        data = nb[f"{name}_dense"] + nb[f"{name}_sparse"]
        assert nb[f"{name}_sparse"] == HKV * n_s * (64 * D + 64 * D // 8)
        assert abs(HKV * blocks * 64 * D * 2 / data - 16 / (16 - 7 * S)) < 1e-12
    assert nb["compression_ratio"] > 1.4
    assert cache.allocated_nbytes() < 2 * HKV * 8192 * D * 2  # pools smaller than a dense cache


def test_attend_in_a_cuda_graph_follows_appends(lib):
    cache = HieraCache(lib, batch=2, num_kv_heads=HKV, head_dim=D, max_seq_len=2048, key_ratio=1.0, value_ratio=1.0)
    model = Model(cache, 2048, seed=11)
    cache.prefill(model.k[:, :, :1000], model.v[:, :, :1000], [1000, 900])
    q = _rand(2, HQ, D, seed=12)
    graph, _, (out, _) = capture_graph(lambda: cache.attend(q, num_splits=4))
    for _ in range(3):  # no flush: table and lengths change in place
        pos = cache.lengths
        cache.append(model.k[torch.arange(2), :, pos], model.v[torch.arange(2), :, pos])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, cache.attend(q, num_splits=4)[0])


@pytest.mark.parametrize("ratios", [(0.5, 0.25), (1.0, 1.0)])
def test_captured_decode_step_replays_like_eager_steps(lib, ratios):
    """append + attend captured once, replayed across block starts and flushes, equals the
    same steps run eagerly on a twin cache: outputs, pools, tables and (after sync) the host
    bookkeeping."""
    kr, vr = ratios
    caches = [HieraCache(lib, batch=2, num_kv_heads=HKV, head_dim=D, max_seq_len=2048, key_ratio=kr,
                         value_ratio=vr) for _ in range(2)]
    model = Model(caches[0], 2048, seed=21)
    for c in caches:
        c.prefill(model.k[:, :, :700], model.v[:, :, :700], [300, 700])
    k_in = torch.empty(2, HKV, D, dtype=torch.float16, device="cuda")
    v_in, q_in = torch.empty_like(k_in), torch.empty(2, HQ, D, dtype=torch.float16, device="cuda")
    graphed, eager = caches

    def step():
        graphed.append(k_in, v_in)
        return graphed.attend(q_in, num_splits=3)

    pos = list(graphed.lengths)
    k_in.copy_(model.k[torch.arange(2), :, pos])  # the warm-up run is a real first step
    v_in.copy_(model.v[torch.arange(2), :, pos])
    q_in.copy_(_rand(2, HQ, D, seed=22))
    graph, _, (out, lse) = capture_graph(step)
    eager.append(k_in.clone(), v_in.clone())
    pos = [p + 1 for p in pos]
    for i in range(300):  # 300 steps cross 4-5 block boundaries per sequence
        q = _rand(2, HQ, D, seed=100 + i)
        k, v = model.k[torch.arange(2), :, pos], model.v[torch.arange(2), :, pos]
        k_in.copy_(k), v_in.copy_(v), q_in.copy_(q)
        graph.replay()
        eager.append(k, v)
        want, want_lse = eager.attend(q, num_splits=3)
        assert torch.equal(out, want) and torch.equal(lse, want_lse), f"step {i}"
        pos = [p + 1 for p in pos]
    assert graphed._stale
    graphed.sync()
    assert graphed.lengths == eager.lengths == pos
    for name in ("k", "v"):
        g, e = getattr(graphed, name), getattr(eager, name)
        assert torch.equal(g.table, e.table) and g.n_sparse == e.n_sparse and g.free == e.free
        assert g.uniform[0][pos[0] // 64] == e.uniform[0][pos[0] // 64]
    assert graphed.n_eligible == eager.n_eligible
    for a, b in zip(graphed.to_dense(), eager.to_dense()):
        assert torch.equal(a, b)
    assert torch.equal(graphed.ctrl, eager.ctrl)
    # the host copy, pulled back, drives later host-side work: one more eager step agrees
    k, v = model.k[torch.arange(2), :, pos], model.v[torch.arange(2), :, pos]
    graphed.append(k, v), eager.append(k, v)
    assert torch.equal(graphed.ctrl, eager.ctrl) and graphed.lengths == eager.lengths


def test_captured_steps_past_capacity_store_nothing_and_sync_raises(lib):
    cache = HieraCache(lib, batch=2, num_kv_heads=HKV, head_dim=D, max_seq_len=192, key_ratio=1.0, value_ratio=1.0,
                       sink=0, local_window=64)
    model = Model(cache, 192, seed=31)
    cache.prefill(model.k[:, :, :190], model.v[:, :, :190], [150, 190])
    before = [x.clone() for x in cache.to_dense()]
    k_in = _rand(2, HKV, D, seed=32)
    graph, _, _ = capture_graph(lambda: cache.append(k_in, k_in))
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert cache.seqlens.tolist() == [156, 192]  # warm-up + 5 replays; sequence 1 stopped at capacity
    with pytest.raises(CacheFullError, match=r"sequences \[1\] reached the cache capacity 192 during captured"):
        cache.sync()
    hk, _ = cache.to_dense()
    assert torch.equal(hk[1, :, :64], before[0][1, :, :64])  # nothing overwritten; block 1 left the window
    assert torch.equal(hk[1, :, 64:128], fmt.prune_k(before[0][1:2, :, 64:128])[0])
    assert torch.equal(hk[1, :, 128:190], before[0][1, :, 128:190])
    assert torch.equal(hk[1, :, 190:192], k_in[1].unsqueeze(1).expand(-1, 2, -1))
    cache.reset()
    assert cache.lengths == [0, 0] and int(cache.ctrl[:, 5].abs().sum()) == 0
