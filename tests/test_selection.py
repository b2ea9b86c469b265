"""Block selection policies (hierasparse_gen.selection) in the simulation: the attention mass
against a float64 brute force, which blocks each policy makes 2:4, the query-weighted choice of
K's channels, and the errors. (The kernels' path: tests/test_gpu_cache.py, test_gpu_real.py.)"""

import pytest
import torch

from hierasparse_gen import format as fmt
from hierasparse_gen.errors import InputError
from hierasparse_gen.policy import ratio_count
from hierasparse_gen.selection import (attention_mass, channel_weights, resolve, resolve_channels, resolve_tokens,
                                       token_mass)
from hierasparse_gen.simulate import SimulatedCache

H, G, D, S = 2, 3, 64, 32


def _inputs(L, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, H, L, D, generator=g)
    v = torch.randn(1, H, L, D, generator=g)
    q = torch.randn(1, H * G, L, D, generator=g) * 2  # peaked enough that blocks differ in mass
    return q, k, v


def _sim(L, **kw):
    return SimulatedCache(batch=1, num_kv_heads=H, head_dim=D, max_seq_len=L, dtype=torch.float32, block_size=S,
                          sink=S, local_window=2 * S, **kw)


def test_attention_mass_against_brute_force():
    q, k, _ = _inputs(300, 1)
    W = 40
    got = attention_mass(q[0, :, -W:], k[0], S, None)
    want = torch.zeros(H, 300 // S, dtype=torch.float64)
    for hq in range(H * G):
        for i in range(W):
            pos = 300 - W + i
            s = (q[0, hq, pos].double() @ k[0, hq // G, :pos + 1].double().T) / D ** 0.5
            p = torch.softmax(s, -1)
            for blk in range(300 // S):
                want[hq // G, blk] += p[blk * S:(blk + 1) * S].sum()
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6)
    # every query's mass sums to 1 (the last, partial block holds the rest)
    assert float(got.sum()) <= H * G * W + 1e-3


@pytest.mark.parametrize("selection", ["attention", "expected_error", "prune_loss"])
def test_each_policy_makes_its_least_scored_blocks_24(selection):
    L = 20 * S
    q, k, v = _inputs(L, 2)
    sim = _sim(L, key_ratio=0.5, value_ratio=0.25, selection=selection, observe=48, key_channels="magnitude",
               value_tokens="magnitude")
    sim.prefill(k, v, q=q)
    elig = 20 - 1 - 2
    mass = attention_mass(q[0, :, -48:], k[0], S, None)[:, 1:1 + elig]
    for name, x, ratio in (("k", k, 0.5), ("v", v, 0.25)):
        loss = fmt.block_prune_loss(x, name, S)[0, :, 1:1 + elig]
        score = {"attention": mass, "expected_error": mass * loss, "prune_loss": loss}[selection]
        n = ratio_count(ratio, elig)
        want = torch.zeros(H, 20, dtype=torch.bool)
        want.scatter_(1, torch.argsort(score, dim=-1, stable=True)[:, :n] + 1, True)
        assert torch.equal(sim.tiers(name)[0], want), name
    # the policies disagree on these inputs, so the test can tell them apart
    if selection == "attention":
        other = _sim(L, key_ratio=0.5, value_ratio=0.25, selection="prune_loss")
        other.prefill(k, v, q=q)
        assert not torch.equal(other.tiers("k"), sim.tiers("k"))


def test_auto_reads_queries_when_given():
    L = 16 * S
    q, k, v = _inputs(L, 3)
    runs = {}
    for name, selection, channels, tokens, queries in (
            ("auto+q", "auto", "auto", "auto", q), ("best", "attention", "query", "attention", q),
            ("auto", "auto", "auto", "auto", None), ("prune_loss", "prune_loss", "magnitude", "magnitude", q)):
        sim = _sim(L, key_ratio=0.5, value_ratio=0.5, selection=selection, key_channels=channels,
                   value_tokens=tokens)
        sim.prefill(k, v, q=queries)
        runs[name] = (sim.tiers("k"), sim.tiers("v"), *sim.to_dense())
    for a, b in (("auto+q", "best"), ("auto", "prune_loss")):
        assert all(torch.equal(x, y) for x, y in zip(runs[a], runs[b])), (a, b)
    assert not torch.equal(runs["auto+q"][2], runs["auto"][2])
    assert not torch.equal(runs["auto+q"][3], runs["auto"][3])
    assert resolve("auto", True) == "attention" and resolve("auto", False) == "prune_loss"
    assert resolve_channels("auto", True) == "query" and resolve_channels("auto", False) == "magnitude"
    assert resolve_tokens("auto", True) == "attention" and resolve_tokens("auto", False) == "magnitude"


def test_select_q_chooses_without_attending():
    """hf's attend-then-compress path passes the prompt's queries for selection only (no output)."""
    L = 16 * S
    q, k, v = _inputs(L, 4)
    a, b = _sim(L, key_ratio=1, value_ratio=0.5), _sim(L, key_ratio=1, value_ratio=0.5)
    assert a.prefill(k, v, select_q=q) is None
    b.prefill(k, v, q=q, mode="attend_then_compress")
    assert torch.equal(a.tiers("v"), b.tiers("v")) and torch.equal(a.to_dense()[0], b.to_dense()[0])


def test_query_weighted_key_channels():
    L = 16 * S
    q, k, v = _inputs(L, 5)
    q[..., 0::4] *= 50  # queries lean on the first channel of every group of 4: it must survive 2:4 in K
    sim = _sim(L + S, key_ratio=1, value_ratio=0, key_channels="query", selection="prune_loss")
    sim.prefill(k, v, q=q)
    w = channel_weights(q[0, :, -64:], H)                       # [H, D]
    assert torch.allclose(sim.key_weight[0, :, 0], w)
    tiers = sim.tiers("k")[0].repeat_interleave(S, -1)[:, :L].unsqueeze(-1)  # [H, L, 1]
    want = torch.where(tiers, fmt.prune_k(k[0], w.unsqueeze(1)), k[0])
    got = sim.to_dense()[0][0]
    assert torch.equal(got, want)
    kept = got[tiers.squeeze(-1)] != 0                          # [2:4 rows, D]: the kept channels
    assert kept[:, 0::4].float().mean() > 0.95 and kept[:, 1::4].float().mean() < 0.7
    # the choice is by |k| * w: never keeps a channel whose product is below both dropped ones
    plain = _sim(L + S, key_ratio=1, value_ratio=0, selection="prune_loss")
    plain.prefill(k, v)
    assert not torch.equal(plain.to_dense()[0], got)
    # decode flushes keep the same weights
    for i in range(S):  # the tokens again, as a block of new ones
        sim.append(k[:, :, i], v[:, :, i])
    blk = (L + S) // S - 2 - 1  # the block that left the window
    flushed = sim.to_dense()[0][0, :, blk * S:(blk + 1) * S]
    assert sim.tiers("k")[0, :, blk].all()
    assert torch.equal(flushed, fmt.prune_k(k[0, :, blk * S:(blk + 1) * S], w.unsqueeze(1)))


def test_ratio_zero_is_dense_under_every_policy():
    L = 12 * S
    q, k, v = _inputs(L, 6)
    for selection in ("attention", "expected_error"):
        sim = _sim(L, key_ratio=0, value_ratio=0, selection=selection, key_channels="query")
        sim.prefill(k, v, q=q)
        assert torch.equal(sim.to_dense()[0], k) and torch.equal(sim.to_dense()[1], v)


def test_errors():
    L = 8 * S
    q, k, v = _inputs(L, 7)
    with pytest.raises(InputError, match="selection 'nearest' is not a block selection. Fix: use one of auto"):
        _sim(L, key_ratio=0, value_ratio=0, selection="nearest")
    with pytest.raises(InputError, match="key_channels 'abs' is not known"):
        _sim(L, key_ratio=0, value_ratio=0, key_channels="abs")
    with pytest.raises(InputError, match="observe 0"):
        _sim(L, key_ratio=0, value_ratio=0, observe=0)
    sim = _sim(L, key_ratio=0.5, value_ratio=0, selection="attention")
    with pytest.raises(InputError, match="chooses blocks by the prompt's queries, and this prefill has none"):
        sim.prefill(k, v)
    assert sim.lengths == [0]
    sim = _sim(L, key_ratio=0, value_ratio=0.5, value_tokens="attention")
    with pytest.raises(InputError, match="value_tokens 'attention' chooses blocks by the prompt's queries"):
        sim.prefill(k, v)


def test_attention_weighted_value_tokens():
    L = 16 * S
    q, k, v = _inputs(L, 8)
    sim = _sim(L + S, key_ratio=0, value_ratio=1, selection="prune_loss", value_tokens="attention")
    sim.prefill(k, v, q=q)
    w = sim.value_weight[0, :, :L]                                  # [H, L, 1]
    # every prompt token weighs sqrt(mass) (mass normalized to mean 1 over the prompt): the blocks eligible at the
    # prefill, and the window's when they leave it; tokens after the prompt weigh 1
    mass = token_mass(q[0, :, -64:], k[0], None)
    assert torch.equal(w[:, :, 0], (mass / mass.mean(-1, keepdim=True)).sqrt())
    assert torch.equal(sim.value_weight[0, :, L:], torch.ones(H, S, 1))
    tiers = sim.tiers("v")[0].repeat_interleave(S, -1)[:, :L].unsqueeze(-1)
    want = torch.where(tiers, fmt.prune_v(v[0], w), v[0])
    assert torch.equal(sim.to_dense()[1][0], want)
    plain = _sim(L, key_ratio=0, value_ratio=1, selection="prune_loss")
    plain.prefill(k, v)
    assert not torch.equal(plain.to_dense()[1], sim.to_dense()[1])
    # the most attended token of each head's 2:4 blocks keeps most of its channels (half, unweighted)
    heavy = (w[..., 0] * tiers[..., 0]).argmax(-1)                 # [H]
    for h in range(H):
        kept = (sim.to_dense()[1][0, h, heavy[h]] != 0).float().mean()
        plain_kept = (plain.to_dense()[1][0, h, heavy[h]] != 0).float().mean()
        assert kept > 0.7 and kept > plain_kept
    # a block of the prompt's window that leaves it during decode is pruned with the prompt's weights
    out = slice(L - 2 * S, L - S)
    assert torch.equal(sim.to_dense()[1][0, :, out], v[0, :, out])  # still dense in the window
    g = torch.Generator().manual_seed(3)
    for _ in range(S):
        sim.append(torch.randn(1, H, D, generator=g), torch.randn(1, H, D, generator=g))
    assert torch.equal(sim.to_dense()[1][0, :, out], fmt.prune_v(v[0, :, out], w[:, out]))
    assert not torch.equal(sim.to_dense()[1][0, :, out], fmt.prune_v(v[0, :, out]))


def test_output_error_of_v_is_the_windows_output_change():
    """For V the first-order change is exact: pruning one block moves the window's outputs by
    sum_t p_t (v_t - v^_t)."""
    from hierasparse_gen.reference import prefill_reference
    from hierasparse_gen.selection import output_error
    L, W = 10 * S, 24
    q, k, v = _inputs(L, 9)
    got = output_error(q[0, :, -W:], k[0], v[0], S, None, "v")             # [H, blocks]
    full, _ = prefill_reference(q[:, :, -W:], k, v, torch.tensor([L]), qlens=torch.tensor([W]))
    for blk in (1, 4):
        pruned = v.clone()
        pruned[:, :, blk * S:(blk + 1) * S] = fmt.prune_v(v[:, :, blk * S:(blk + 1) * S])
        out, _ = prefill_reference(q[:, :, -W:], k, pruned, torch.tensor([L]), qlens=torch.tensor([W]))
        want = (out - full)[0].view(H, G * W, D).pow(2).sum((1, 2))
        assert torch.allclose(got[:, blk].double(), want, rtol=1e-3), blk
    # K: first order in the score change; a block whose pruning drops nothing costs nothing
    k2 = k.clone()
    k2[:, :, 2 * S:3 * S, 2::4] = 0
    k2[:, :, 2 * S:3 * S, 3::4] = 0
    err = output_error(q[0, :, -W:], k2[0], v[0], S, None, "k")
    assert (err[:, 2] == 0).all() and (err[:, 3] > 0).all()


def test_output_error_selection_in_the_cache():
    L = 16 * S
    q, k, v = _inputs(L, 10)
    sim = _sim(L, key_ratio=0.5, value_ratio=0.5, selection="output_error", key_channels="magnitude",
               value_tokens="magnitude")
    sim.prefill(k, v, q=q)
    from hierasparse_gen.selection import output_error
    for name in "kv":
        err = output_error(q[0, :, -64:], k[0], v[0], S, None, name)[:, 1:1 + 13]
        chosen = sim.tiers(name)[0][:, 1:1 + 13]
        assert (chosen.sum(-1) == ratio_count(0.5, 13)).all()
        assert (torch.where(chosen, err, -1.0).amax(-1) <= torch.where(chosen, float("inf"), err).amin(-1)).all()


def test_output_error_is_the_simulations_only():
    """The study policy runs in the simulation; the GPU cache and enable's kernels backend refuse it, naming the
    policies they have."""
    from hierasparse_gen.selection import check_selection
    check_selection("output_error", "auto", 64, simulation=True)
    with pytest.raises(InputError, match=r"'output_error' is a study policy of the simulation only .*"
                                         r"Fix: use selection='attention' \(or 'auto'\), 'expected_error'"):
        check_selection("output_error", "auto", 64)
    for selection in ("auto", "attention", "expected_error", "prune_loss"):
        check_selection(selection, "auto", 64)


@pytest.mark.parametrize("L", [5, S, 3 * S])
def test_prompts_without_eligible_blocks(L):
    """A prompt shorter than sink + window + a block has nothing to choose or weigh: the defaults (all "auto", with
    queries) store it as it is."""
    q, k, v = _inputs(L, 11)
    sim = _sim(max(L, 4 * S), key_ratio=1, value_ratio=1)
    sim.prefill(k, v, q=q)
    assert sim.n_eligible == [0] and torch.equal(sim.to_dense()[1][0, :, :L], v[0])


def test_retier_pick_rule():
    """The least mass among the dense eligible blocks and the leaving one; ties to the leaving block, then the
    lowest index (the append kernel's rule)."""
    from hierasparse_gen.selection import retier_pick
    inf = float("inf")
    mass = torch.tensor([[3.0, 1.0, 2.0, 1.0], [3.0, 1.0, 2.0, 5.0], [2.0, 2.0, 9.0, 2.0], [inf, inf, inf, inf]])
    dense = torch.tensor([[True, True, True, True], [True, False, True, True], [True, True, True, True],
                          [True, True, True, True]])
    assert retier_pick(mass, dense, 3).tolist() == [3, 2, 3, 3]
    assert retier_pick(mass, dense, 2).tolist() == [1, 2, 0, 2]


def test_decode_retiers_by_visible_mass():
    """At a decode flush that adds a 2:4 block, each head's least-mass dense eligible block becomes 2:4 (masses
    of the prompt per visible query; the budget as by count); a later chunk's flushes go by count."""
    from hierasparse_gen.selection import visible_block_mass
    L = 12 * S
    q, k, v = _inputs(L + 3 * S, 4)
    sim = _sim(L + 3 * S, key_ratio=0, value_ratio=0.6, value_tokens="attention")
    sim.prefill(k[:, :, :L], v[:, :, :L], q=q[:, :, :L])
    before = sim.tiers("v")[0].clone()
    mass = visible_block_mass(token_mass(q[0, :, L - 64:L], k[0, :, :L], None), 64, S)
    assert torch.equal(sim.block_mass[0, :, :L // S], mass)
    for i in range(S):  # one flush: block 10 leaves the window (sink 1, window 2: 9 eligible blocks, then 10)
        sim.append(k[:, :, L + i], v[:, :, L + i])
    after = sim.tiers("v")[0]
    assert int(before.sum()) == H * 5 and sim.n_sparse["v"] == [6]  # 0.6 of 9, then of 10
    picked_older = 0
    for h in range(H):
        new = torch.nonzero(after[h] & ~before[h]).flatten().tolist()
        dense = [b for b in range(1, 11) if not before[h, b]]
        assert new == [min(dense, key=lambda b: (mass[h, b].item(), b != 10, b))], (h, new, dense)
        picked_older += new != [10]
    assert picked_older, "some head should re-tier an older block"
    # the re-tiered blocks are stored pruned with their weights, the leaving one stays dense when not picked
    want = torch.where(after.repeat_interleave(S, -1)[:, :L + S].unsqueeze(-1),
                       fmt.prune_v(v[0, :, :L + S], sim.value_weight[0, :, :L + S]), v[0, :, :L + S])
    assert torch.equal(sim.to_dense()[1][0], want)


def test_e4m3_tensors_leave_the_window_by_count():
    """A tensor in e4m3 is not re-tiered at decode (its held dense blocks are e4m3: the values a re-tiering would
    compress are gone): the leaving block becomes 2:4 when the count asks, while a model-dtype tensor of the same
    cache re-tiers by mass."""
    L = 12 * S
    q, k, v = _inputs(L + 3 * S, 4)
    sim = _sim(L + 3 * S, key_ratio=0.6, value_ratio=0.6, value_tokens="attention", value_storage="float8_e4m3")
    sim.prefill(k[:, :, :L], v[:, :, :L], q=q[:, :, :L])
    before = {n: sim.tiers(n)[0].clone() for n in "kv"}
    for i in range(S):  # block 10 leaves the window
        sim.append(k[:, :, L + i], v[:, :, L + i])
    new = {n: sim.tiers(n)[0] & ~before[n] for n in "kv"}
    assert new["v"].sum(-1).tolist() == [1] * H and bool(new["v"][:, 10].all())  # by count: the leaving block
    assert bool(new["k"][:, :10].any()), "K (model dtype) should re-tier an older block in some head"
