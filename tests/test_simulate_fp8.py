"""SimulatedCache with e4m3 storage: eligible blocks (dense or 2:4) hold format_fp8's dequantized values, the sink,
window and newest partial block the model's; the same after appends, flushes, set_tiers and reset; the default
storage unchanged; nbytes against hand counts."""

import pytest
import torch

from hierasparse_gen import format_fp8 as f8
from hierasparse_gen.errors import InputError
from hierasparse_gen.format import prune_k, prune_v
from hierasparse_gen.policy import eligible_blocks
from hierasparse_gen.reference import decode_reference, prefill_reference
from hierasparse_gen.simulate import SimulatedCache

S, D, H = 64, 64, 2


def _cache(batch, k_store="model", v_store="float8_e4m3", dtype=torch.float32, kr=0.5, vr=0.5, window=128):
    return SimulatedCache(batch=batch, num_kv_heads=H, head_dim=D, max_seq_len=1024, key_ratio=kr, value_ratio=vr,
                          dtype=dtype, block_size=S, sink=64, local_window=window, key_storage=k_store,
                          value_storage=v_store)


def _expected(c: SimulatedCache, name: str) -> torch.Tensor:
    """What the cache must store, block by block, from the originals, its tiers and its lengths alone."""
    x = c.x[name]
    out = x.clone()
    for b, n in enumerate(c.lengths):
        first = c.sink // S
        last = first + eligible_blocks(n // S, first, c.window // S)
        for blk in range(first, last):
            for h in range(H):
                xb = x[b, h, blk * S:(blk + 1) * S]
                sparse = bool(c.sparse[name][b, h, blk])
                if c.storage[name] == "model":
                    want = (prune_k(xb) if name == "k" else prune_v(xb)) if sparse else xb
                else:
                    want = f8.stored_values(xb, name, sparse)
                out[b, h, blk * S:(blk + 1) * S] = want
        assert not c.sparse[name][b, :, :first].any() and not c.sparse[name][b, :, last:].any()
    return out


@pytest.mark.parametrize("k_store,v_store", [("model", "float8_e4m3"), ("float8_e4m3", "float8_e4m3"),
                                             ("float8_e4m3", "model")])
def test_stored_blocks_follow_prefill_appends_and_flushes(k_store, v_store):
    g = torch.Generator().manual_seed(0)
    c = _cache(2, k_store, v_store)
    k, v = torch.randn(2, H, 700, D, generator=g), torch.randn(2, H, 700, D, generator=g)
    c.prefill(k, v, [700, 450])
    for name in "kv":
        assert torch.equal(c.view(name), _expected(c, name)), name
    n_sparse = {n: int(c.tiers(n).sum()) for n in "kv"}
    for step in range(140):  # two or three blocks of each sequence leave the window
        c.append(torch.randn(2, H, D, generator=g), torch.randn(2, H, D, generator=g))
        if step % 35 == 34:
            q = torch.randn(2, 4, D, generator=g)
            out, _ = c.attend(q)
            ref, _ = decode_reference(q, _expected(c, "k"), _expected(c, "v"), torch.tensor(c.lengths))
            assert torch.allclose(out, ref.float(), rtol=1e-6, atol=1e-6), step
    for name in "kv":
        assert torch.equal(c.view(name), _expected(c, name)), name
        assert int(c.tiers(name).sum()) > n_sparse[name]  # some flushed blocks became 2:4 ...
        e4m3 = c.storage[name] != "model"
        # ... and the dense eligible ones changed only where e4m3 stores them
        blk = c.sink // S + 1
        dense = ~c.sparse[name][:, :, blk]
        same = (c.view(name)[:, :, blk * S:(blk + 1) * S] == c.x[name][:, :, blk * S:(blk + 1) * S]).all(-1).all(-1)
        if bool(dense.any()):
            assert bool((same[dense] != e4m3).all())
    # sink, window and the partial block stay in the model dtype exactly
    for name in "kv":
        for b, n in enumerate(c.lengths):
            tail = (n // S - c.window // S) * S
            assert torch.equal(c.view(name)[b, :, tail:n], c.x[name][b, :, tail:n])
            assert torch.equal(c.view(name)[b, :, :c.sink], c.x[name][b, :, :c.sink])


def test_model_storage_is_unchanged_by_the_option():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, H, 600, D, generator=g), torch.randn(1, H, 600, D, generator=g)
    a = _cache(1, "model", "model")
    b = SimulatedCache(batch=1, num_kv_heads=H, head_dim=D, max_seq_len=1024, key_ratio=0.5, value_ratio=0.5,
                       dtype=torch.float32, block_size=S, sink=64, local_window=128)
    for c in (a, b):
        c.prefill(k, v)
        for _ in range(70):
            c.append(k[:, :, 0] * 0.5, v[:, :, 1] * 0.5)
    for name in "kv":
        assert torch.equal(a.view(name), b.view(name)) and torch.equal(a.view(name), _expected(a, name))
    assert a.nbytes() == b.nbytes()
    assert a.nbytes()["k_dense_fp8"] == 0 and a.nbytes()["v_dense_fp8"] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_caches_keep_their_dtype(dtype):
    g = torch.Generator().manual_seed(2)
    c = _cache(1, "float8_e4m3", "float8_e4m3", dtype=dtype)
    k, v = torch.randn(1, H, 500, D, generator=g).to(dtype), torch.randn(1, H, 500, D, generator=g).to(dtype)
    c.prefill(k, v)
    for name in "kv":
        assert c.view(name).dtype == dtype and torch.equal(c.view(name), _expected(c, name))


def test_set_tiers_and_reset_quantize_from_the_originals_once():
    g = torch.Generator().manual_seed(3)
    c = _cache(1, "float8_e4m3", "float8_e4m3", kr=0.0, vr=0.0)
    k, v = torch.randn(1, H, 640, D, generator=g), torch.randn(1, H, 640, D, generator=g)
    c.prefill(k, v)
    before = c.view("k")
    flags = torch.zeros_like(c.sparse["k"])
    flags[0, :, 3] = True
    c.set_tiers("k", flags)
    assert torch.equal(c.view("k"), _expected(c, "k"))
    flags[0, :, 3] = False
    c.set_tiers("k", flags)  # back to dense e4m3: the same bytes as before, not quantized twice
    assert torch.equal(c.view("k"), before)
    c.reset()
    c.prefill(k[:, :, :400], v[:, :, :400])
    for name in "kv":
        assert torch.equal(c.view(name)[:, :, :400], _expected(c, name)[:, :, :400])


def test_modes_that_attend_during_prefill_read_the_e4m3_blocks():
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, H, 512, D, generator=g), torch.randn(1, H, 512, D, generator=g)
    q = torch.randn(1, 4, 64, D, generator=g)
    c = _cache(1, "float8_e4m3", "float8_e4m3")
    c.prefill(k[:, :, :448], v[:, :, :448])
    out, _ = c.prefill(k[:, :, 448:], v[:, :, 448:], q=q, mode="compress_then_attend")
    ref, _ = prefill_reference(q, _expected(c, "k")[:, :, :512], _expected(c, "v")[:, :, :512], torch.tensor([512]),
                               None, torch.tensor([64]))
    assert torch.allclose(out, ref.float(), rtol=1e-5, atol=1e-5)


def test_a_bad_storage_is_refused():
    with pytest.raises(InputError, match="key_storage 'fp8' is not a storage.*Fix:"):
        _cache(1, "fp8", "model")
    with pytest.raises(InputError, match="value_storage 'e4m3' is not a storage.*Fix:"):
        _cache(1, "model", "e4m3")


def test_nbytes_counts_e4m3_blocks_by_hand():
    g = torch.Generator().manual_seed(5)
    c = _cache(2, "float8_e4m3", "model", kr=0.5, vr=1.0)
    c.prefill(torch.randn(2, H, 700, D, generator=g), torch.randn(2, H, 700, D, generator=g), [700, 450])
    got = c.nbytes(itemsize=2)
    # 700 tokens: 10 full blocks + 1 partial; sink 1, window 2 -> 7 eligible; 450: 7 full + 1 -> 4 eligible
    blocks, elig = (11 + 8) * H, (7 + 4) * H
    n_k = (4 + 2) * H  # round(0.5 * 7) = 4, round(0.5 * 4) = 2
    n_v = elig
    assert int(c.tiers("k").sum()) == n_k and int(c.tiers("v").sum()) == n_v
    e4m3_dense, e4m3_24 = S * D + 2 * S, S * D // 2 + S * D // 8 + 2 * S
    assert got["k_dense"] == (blocks - elig) * S * D * 2
    assert got["k_dense_fp8"] == (elig - n_k) * e4m3_dense
    assert got["k_sparse"] == n_k * e4m3_24
    assert got["v_dense"] == (blocks - n_v) * S * D * 2 and got["v_dense_fp8"] == 0
    assert got["v_sparse"] == n_v * (S * D + S * D // 8)
    assert got["table"] == 2 * 2 * H * c.max_blocks * 4
    assert got["total"] == sum(got[f"{n}_{t}"] for n in "kv" for t in ("dense", "dense_fp8", "sparse")) + got["table"]
    assert got["dense_equivalent"] == 2 * blocks * S * D * 2
    # float32 values (the default itemsize) double the model-dtype parts only
    full = c.nbytes()
    assert full["k_dense"] == 2 * got["k_dense"] and full["k_dense_fp8"] == got["k_dense_fp8"]
    assert full["k_sparse"] == got["k_sparse"] and full["v_sparse"] == n_v * (S * D * 2 + S * D // 8)
