"""HieraCache's chunk extension (the path of every prefill chunk after a sequence's first) on
the CPU: a stand-in library compresses with the torch packer (the GPU kernel is bit-identical
to it), and the result must equal the torch simulation fed the same tokens one at a time."""

from types import SimpleNamespace

import pytest
import torch

from hierasparse_gen import format as fmt
from hierasparse_gen.cache import HieraCache
from hierasparse_gen.simulate import SimulatedCache

H, D = 2, 64


class TorchPackerLib:
    manifest = {"spec": {"cache": {}}}

    @staticmethod
    def compress_k(x):
        return SimpleNamespace(values=fmt.pack_k(x)[0], meta=fmt.pack_k(x)[1])

    @staticmethod
    def compress_v(x):
        return SimpleNamespace(values=fmt.pack_v(x)[0], meta=fmt.pack_v(x)[1])


@pytest.mark.parametrize("ratios", [(1.0, 1.0), (0.5, 0.25), (0.0, 0.7)])
@pytest.mark.parametrize("chunks", [[100, 1, 63, 64, 200], [700], [5, 300, 129, 64, 2]])
def test_chunks_enter_like_single_tokens(ratios, chunks):
    total = sum(chunks)
    kw = dict(batch=2, num_kv_heads=H, head_dim=D, max_seq_len=total + 64, key_ratio=ratios[0],
              value_ratio=ratios[1], dtype=torch.float16, device="cpu", block_size=64, sink=64, local_window=128)
    cache, sim = HieraCache(TorchPackerLib(), **kw), SimulatedCache(**kw)
    g = torch.Generator().manual_seed(sum(chunks))
    k = torch.randn(2, H, total, D, generator=g).half()
    v = torch.randn(2, H, total, D, generator=g).half()
    at = 0
    for n in chunks:
        for b in range(2):
            cache._extend_sequence(b, k[b, :, at:at + n], v[b, :, at:at + n], n)
            sim._push(b, k[b, :, at:at + n], v[b, :, at:at + n])
        at += n
        got, want = cache.to_dense(), sim.to_dense()
        assert cache.lengths == sim.lengths == [at, at]
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"after {at} tokens"
        for name in ("k", "v"):
            assert torch.equal(cache.tiers(name), sim.tiers(name))
            t = getattr(cache, name)
            assert t.n_sparse == sim.n_sparse[name]
            for b in range(2):  # every dense slot is either free or held by exactly one live block
                held = [int(e) for e in t.table[b, 0, :-(-at // 64)] if e >= 0]
                assert sorted(held + t.free[b]) == list(range(t.dense.shape[2]))
        assert cache.n_eligible == sim.n_eligible


def test_prefill_refuses_more_blocks_than_one_selection_takes():
    """The select kernel holds a row's eligible blocks in shared memory: a first prompt with more is refused before
    anything is written, naming the longest first chunk that fits (the rest enters through later prefills)."""
    from hierasparse_gen.errors import InputError
    from hierasparse_gen.ops.cache_kernels import SELECT_MAX_ELIGIBLE, select_blocks
    S, sink, window = 32, 2, 4  # blocks
    fits = (SELECT_MAX_ELIGIBLE + sink + window) * S
    cache = HieraCache(TorchPackerLib(), batch=1, num_kv_heads=1, head_dim=D, max_seq_len=fits + 2 * S,
                       key_ratio=0.5, value_ratio=0.5, dtype=torch.float16, device="cpu", block_size=S,
                       sink=sink * S, local_window=window * S)
    cache._check_selectable([fits + S - 1])  # (a partial block is not eligible)
    with pytest.raises(InputError, match=rf"{SELECT_MAX_ELIGIBLE + 1} eligible 32-token blocks.*nothing was written"
                                         rf".*Fix: prefill its first {fits} tokens"):
        cache._check_selectable([fits + S])  # (prefill's check, before it writes anything)
    assert cache.lengths == [0]
    k = torch.empty(1, 1, 64, D, dtype=torch.float16)
    table = torch.zeros(1, 1, SELECT_MAX_ELIGIBLE + 8, dtype=torch.int32)
    with pytest.raises(InputError, match=rf"select_blocks: {SELECT_MAX_ELIGIBLE + 1} eligible blocks.*Fix:"):
        select_blocks(None, k, None, 0, SELECT_MAX_ELIGIBLE + 1, 0, SELECT_MAX_ELIGIBLE + 1, table)
