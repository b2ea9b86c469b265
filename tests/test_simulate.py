"""The simulated cache keeps its stored K/V current as rows arrive and blocks re-tier: what it stores must
equal pruning the whole cache from scratch, and its attention the float64 reference over that."""

import pytest
import torch

from hierasparse_gen.errors import InputError
from hierasparse_gen.format import prune_k, prune_v
from hierasparse_gen.reference import decode_reference
from hierasparse_gen.simulate import SimulatedCache


def _from_scratch(c: SimulatedCache, name: str) -> torch.Tensor:
    x = c.x[name]
    pruned = prune_k(x) if name == "k" else prune_v(x)
    flags = c.sparse[name].repeat_interleave(c.block, -1).unsqueeze(-1)
    return torch.where(flags, pruned, x)


def _cache(batch: int) -> SimulatedCache:
    return SimulatedCache(batch=batch, num_kv_heads=2, head_dim=64, max_seq_len=640, key_ratio=0.5, value_ratio=1.0,
                          dtype=torch.float32, block_size=64, sink=64, local_window=64)


@pytest.mark.parametrize("batch", [1, 2])
def test_stored_tensors_follow_appends_and_flushes(batch):
    g = torch.Generator().manual_seed(0)
    c = _cache(batch)
    k, v = torch.randn(batch, 2, 300, 64, generator=g), torch.randn(batch, 2, 300, 64, generator=g)
    c.prefill(k, v, [300, 250][:batch])
    flushed = c.tiers("v").sum()
    for step in range(200):  # crosses three block flushes
        c.append(torch.randn(batch, 2, 64, generator=g), torch.randn(batch, 2, 64, generator=g))
        q = torch.randn(batch, 4, 64, generator=g)
        out, lse = c.attend(q)
        ref, ref_lse = decode_reference(q, _from_scratch(c, "k"), _from_scratch(c, "v"), torch.tensor(c.lengths))
        assert torch.allclose(out, ref.float(), rtol=1e-6, atol=1e-6) and torch.allclose(lse, ref_lse.float()), step
    assert c.tiers("v").sum() > flushed  # blocks left the window and became 2:4
    for name in "kv":
        assert torch.equal(c.view(name), _from_scratch(c, name))


def test_set_tiers_restores_and_checks_counts():
    g = torch.Generator().manual_seed(1)
    c = _cache(1)
    c.prefill(torch.randn(1, 2, 512, 64, generator=g), torch.randn(1, 2, 512, 64, generator=g))
    flags = torch.zeros_like(c.sparse["k"])
    flags[0, :, 2] = True
    c.set_tiers("k", flags)
    assert c.n_sparse["k"] == [1] and torch.equal(c.view("k"), _from_scratch(c, "k"))
    flags[0, 0, 3] = True  # head 0 would hold two 2:4 blocks, head 1 one
    with pytest.raises(InputError, match="same count"):
        c.set_tiers("k", flags)


def test_set_tiers_refuses_blocks_outside_the_eligible_ones():
    g = torch.Generator().manual_seed(2)
    c = _cache(1)
    c.prefill(torch.randn(1, 2, 300, 64, generator=g), torch.randn(1, 2, 300, 64, generator=g))
    flags = torch.zeros_like(c.sparse["v"])
    flags[0, :, 0] = True  # the sink
    with pytest.raises(InputError, match="eligible"):
        c.set_tiers("v", flags)
    flags[0, :, 0], flags[0, :, 4] = False, True  # the newest, partial block
    with pytest.raises(InputError, match="eligible"):
        c.set_tiers("v", flags)


def test_an_unknown_prefill_kernel_is_refused():
    c = _cache(1)
    with pytest.raises(InputError, match="not a prefill kernel"):
        c.prefill(torch.randn(1, 2, 64, 64), torch.randn(1, 2, 64, 64), kernel="fast")


def test_nbytes_counts_blocks_as_the_kernels_cache_does():
    g = torch.Generator().manual_seed(3)
    c = _cache(2)
    c.prefill(torch.randn(2, 2, 512, 64, generator=g), torch.randn(2, 2, 512, 64, generator=g), [512, 300])
    got = c.nbytes(itemsize=2)
    S, D, H = 64, 64, 2
    blocks = (8 + 5) * H  # 512 and 300 tokens in 64-token blocks
    n_k = int(c.tiers("k").sum())
    assert n_k > 0 and int(c.tiers("v").sum()) > n_k  # key ratio 0.5, value ratio 1
    assert got["k_sparse"] == n_k * (S * D + S * D // 8) and got["k_dense"] == (blocks - n_k) * S * D * 2
    assert got["dense_equivalent"] == 2 * blocks * S * D * 2 and got["table"] == 2 * 2 * H * c.max_blocks * 4
    assert got["total"] == got["k_dense"] + got["k_sparse"] + got["v_dense"] + got["v_sparse"] + got["table"]
    assert c.nbytes()["k_dense"] == 2 * got["k_dense"]  # float32 values by default
