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
