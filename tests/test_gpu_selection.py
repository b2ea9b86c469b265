"""The query-aware selection's scoring on the GPU (templates/cache/mass.cuh: each key's attention mass from the
prompt's last queries) against float64, across head_dims, groups, windows and lengths."""
import pytest
import torch

from hierasparse_gen import ops
from hierasparse_gen.selection import token_mass

from helpers import rand

pytestmark = pytest.mark.gpu


def reference_mass(q_obs: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 [B, Hkv, L]: softmax of every window query (query i at position L - W + i, causal) summed over the
    window and the group."""
    B, Hq, W, D = q_obs.shape
    Hkv, L = k.shape[1], k.shape[2]
    s = torch.einsum("bhgwd,bhld->bhgwl", q_obs.double().reshape(B, Hkv, Hq // Hkv, W, D), k.double()) * scale
    late = torch.arange(L, device=k.device).view(1, L) > torch.arange(L - W, L, device=k.device).view(W, 1)
    return torch.softmax(s.masked_fill(late, float("-inf")), -1).sum((2, 3))


# (head_dim, query heads, KV heads, window, length) over tests/specs/gpu_matrix.yaml's shapes: groups 1, 5, 4, 16;
# windows under one 16-row tile and over several; lengths off the kernel's 128- and 256-key ranges, one shorter
# than a range, one equal to the window
CASES = [(64, 4, 4, 64, 3001), (96, 10, 2, 48, 1111), (128, 32, 8, 64, 4097), (256, 16, 1, 64, 700),
         (128, 32, 8, 7, 300), (64, 4, 4, 33, 33)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_token_mass_against_float64(matrix, poison, dtype, case):
    D, HQ, HKV, W, L = case
    q = rand(2, HQ, L + 5, D, seed=D + L, dtype=dtype) * 2  # sharper attention than unit scores
    k = rand(2, HKV, L, D, seed=D + L + 1, dtype=dtype)
    q_obs = q[:, :, L - W:L]  # a strided view, as the cache passes the prompt's last rows
    got = ops.token_mass(matrix, q_obs, k, None)
    want = reference_mass(q_obs, k, D ** -0.5)
    assert got.shape == (2, HKV, L) and got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * HQ // HKV * W)
    torch.testing.assert_close(got.double().sum(-1), torch.full((2, HKV), float(HQ // HKV * W), dtype=torch.float64,
                                                                device="cuda"), rtol=1e-5, atol=0)
    assert torch.equal(ops.token_mass(matrix, q_obs, k, None), got), "two runs gave other bits"
    torch.testing.assert_close(got[1], token_mass(q_obs[1], k[1], None), rtol=1e-4, atol=1e-6 * HQ // HKV * W)


def test_token_mass_scale_and_bad_shapes(matrix, poison):
    q = rand(1, 32, 512, 128, seed=3) * 2
    k = rand(1, 8, 512, 128, seed=4)
    got = ops.token_mass(matrix, q[:, :, -64:], k, 0.05)
    torch.testing.assert_close(got.double(), reference_mass(q[:, :, -64:], k, 0.05), rtol=1e-4, atol=1e-6 * 256)
    with pytest.raises(ValueError, match="token_mass.*Fix"):
        ops.token_mass(matrix, q[:, :30, -64:], k, None)  # 30 query heads over 8 KV heads
    with pytest.raises(ValueError, match="token_mass.*Fix"):
        ops.token_mass(matrix, rand(1, 32, 600, 128, seed=5), k, None)  # a window longer than the prompt


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]])
def test_token_mass_given_the_log_sum_exp(matrix, poison, case):
    """With the window rows' log-sum-exp given (as an attention over the prompt returns it), the kernel's second
    pass alone gives float64's masses, and it reads that lse: one shifted by 1 scales every mass by 1/e."""
    D, HQ, HKV, W, L = case
    q = rand(2, HQ, L + 5, D, seed=D + L, dtype=torch.float16) * 2
    k = rand(2, HKV, L, D, seed=D + L + 1, dtype=torch.float16)
    s = torch.einsum("bhgwd,bhld->bhgwl", q[:, :, L - W:L].double().reshape(2, HKV, HQ // HKV, W, D), k.double())
    late = torch.arange(L, device="cuda").view(1, L) > torch.arange(L - W, L, device="cuda").view(W, 1)
    lse = torch.full((2, HQ, L + 5), float("nan"), device="cuda")  # rows the kernel must not read: NaN
    lse[:, :, L - W:L] = torch.logsumexp((s * D ** -0.5).masked_fill(late, float("-inf")), -1).reshape(2, HQ, W).float()
    got = ops.token_mass(matrix, q[:, :, L - W:L], k, None, lse[:, :, L - W:L])
    want = reference_mass(q[:, :, L - W:L], k, D ** -0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * HQ // HKV * W)
    shifted = ops.token_mass(matrix, q[:, :, L - W:L], k, None, lse[:, :, L - W:L] + 1)
    torch.testing.assert_close(shifted.double(), want * torch.e ** -1, rtol=1e-4, atol=1e-6 * HQ // HKV * W)


def test_select_blocks_ties_and_special_scores(matrix, poison):
    """The select kernel picks per row the n_sparse eligible blocks that torch.argsort (stable) puts first, over many
    tiles of the CTA's 256 threads, the last partial: ties by block, -0 tying +0, infinities, NaN after every number."""
    rows, first, n_elig, blocks, max_blocks = 6, 2, 2500, 2508, 2600
    g = torch.Generator(device="cuda").manual_seed(7)
    loss = torch.randint(0, 40, (1, rows, blocks), generator=g, device="cuda").float() * 0.25  # many ties
    loss[0, 1] = torch.rand(blocks, generator=g, device="cuda")
    loss[0, 2, ::3] = -0.0
    loss[0, 2, 1::3] = 0.0
    loss[0, 3, ::7] = float("nan")
    loss[0, 3, 1::7] = float("inf")
    loss[0, 3, 2::7] = -float("inf")
    loss[0, 4] = -loss[0, 4]
    loss[0, 5] = 1.5  # all equal
    x = torch.empty(1, rows, 1, 128, dtype=torch.float16, device="cuda")  # names the variant (head_dim, dtype)
    for n_sparse, n_sparse2 in ((0, 1), (1, 0), (700, 2500), (1250, 1250), (2499, 3), (2500, 700)):
        table, table2 = (torch.full((1, rows, max_blocks), -77, dtype=torch.int32, device="cuda") for _ in range(2))
        ops.select_blocks(matrix, x, loss, first, n_elig, n_sparse, blocks, table)
        ops.select_blocks(matrix, x, loss, first, n_elig, n_sparse2, blocks, table2)
        both, both2 = torch.full_like(table, -77), torch.full_like(table, -77)
        ops.select_blocks(matrix, x, loss, first, n_elig, n_sparse, blocks, both, n_sparse2, both2)
        assert torch.equal(both, table) and torch.equal(both2, table2)  # one launch for two tables
        elig = loss[0, :, first:first + n_elig]
        sparse = torch.zeros(rows, n_elig, dtype=torch.bool, device="cuda")
        sparse.scatter_(1, torch.argsort(elig, dim=-1, stable=True)[:, :n_sparse], True)
        before = torch.cumsum(sparse.int(), -1) - sparse.int()  # 2:4 blocks before each
        want = torch.where(sparse, -(before + 1), torch.arange(n_elig, device="cuda") - before)
        got = table[0]
        assert torch.equal(got[:, first:first + n_elig], want.int()), n_sparse
        dense_after = n_elig - n_sparse + torch.arange(blocks - n_elig, device="cuda", dtype=torch.int32)
        assert torch.equal(got[:, :first], dense_after[:first].expand(rows, -1))  # the sink, then the window
        assert torch.equal(got[:, first + n_elig:blocks], dense_after[first:].expand(rows, -1))
        assert (got[:, blocks:] == -77).all()  # nothing past the prompt's blocks


@pytest.mark.parametrize("n,W,block", [(4097, 64, 64), (3000, 48, 32), (700, 700, 32), (31, 7, 32), (96, 33, 32),
                                        (6151, 64, 96), (8192, 64, 64)])
def test_mass_stats_as_torch(matrix, poison, n, W, block):
    """The stats kernel's block sums, per-query visible block masses and V's token weights, against
    selection.mass_stats in torch, on masses of a real scoring (a partial last block, a window over a block, a prompt
    shorter than a block); the rows it is given are written where asked (strided rows of the cache's tensors) and
    nowhere else."""
    from hierasparse_gen.selection import mass_stats
    q = rand(2, 32, n, 128, seed=n, dtype=torch.float16) * 2
    k = rand(2, 8, n, 128, seed=n + 1, dtype=torch.float16)
    tokens = ops.token_mass(matrix, q[:, :, n - W:], k, None)
    seen = torch.full((2, 8, n // block + 3), -5.0, device="cuda")
    weights = torch.full((2, 8, n + 40), -5.0, device="cuda")
    sums, got_seen, got_weights = ops.mass_stats(matrix, k, tokens, W, block, seen=seen, weights=weights)
    assert got_seen is seen and got_weights is weights and sums.shape == (2, 8, n // block)
    assert (seen[:, :, n // block:] == -5).all() and (weights[:, :, n:] == -5).all()
    for b in range(2):
        want = mass_stats(tokens[b], W, block)
        for got, w in zip((sums[b], seen[b, :, :n // block], weights[b, :, :n]), want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-9)  # (approximate division and root)
    only, none_seen, none_weights = ops.mass_stats(matrix, k, tokens, W, block)
    assert torch.equal(only, sums) and none_seen is None and none_weights is None
    # rows 4 bytes off 16-byte alignment (a contiguous view into a larger buffer): read a float at a time
    shifted = torch.empty(tokens.numel() + 1, device="cuda")[1:].view(tokens.shape).copy_(tokens)
    _, _, off_weights = ops.mass_stats(matrix, k, shifted, W, block, weights=torch.empty(2, 8, n, device="cuda"))
    for b in range(2):
        torch.testing.assert_close(off_weights[b], mass_stats(tokens[b], W, block)[2], rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="mass_stats: seen .* Fix"):
        ops.mass_stats(matrix, k, tokens, W, block, seen=torch.empty(2, 7, n, device="cuda"))  # 7 heads, not 8
    with pytest.raises(ValueError, match="mass_stats: weights .* Fix"):
        ops.mass_stats(matrix, k, tokens, W, block, weights=torch.empty(2, 8, n - 1, device="cuda"))  # short rows


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_channel_weights_as_torch(matrix, poison, dtype, case):
    """K's channel weights from the kernel (a strided view of the prompt's last rows) against
    selection.channel_weights in torch, every head_dim and group of the matrix; written into `out` when given."""
    from hierasparse_gen.selection import channel_weights
    D, HQ, HKV, W, L = case
    q = rand(2, HQ, L + 5, D, seed=D + W, dtype=dtype) * 3
    q[..., 1::7] *= 20  # outlier channels
    got = ops.channel_weights(matrix, q[:, :, L - W:L], HKV)
    assert got.shape == (2, HKV, D) and got.dtype == torch.float32
    torch.testing.assert_close(got, channel_weights(q[:, :, L - W:L], HKV), rtol=1e-5, atol=0)
    out = torch.full((2, HKV, D), -1.0, device="cuda")
    assert ops.channel_weights(matrix, q[:, :, L - W:L], HKV, out=out) is out and torch.equal(out, got)
