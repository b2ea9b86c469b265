"""Study (the first variant; the package's format.compensate_v is the one adopted, see NOTES.md): compensate what a
2:4 V block drops, in the values it keeps.

V is 2:4 along tokens: per channel, each group of 4 consecutive tokens keeps 2 values. Dropping v_c and v_d moves
the attention output by -(p_c v_c + p_d v_d) for a query with probabilities p. With the prompt window's attention
mass m_t (the square of selection.token_weights: mass over its mean) as the expected p, this study adds to the kept
pair the least-norm correction d with m_a d_a + m_b d_b = m_c v_c + m_d v_d (d = r (m_a, m_b) / (m_a^2 + m_b^2)),
so the output under the expected probabilities is unchanged. Same storage and kernels (only kept values change);
blocks without prompt weights (all weights equal) are left as pruned unless --all-blocks. The correction is
clipped to the group's largest |v| (a kept token with almost no mass would otherwise take a huge value).

    PYTHONPATH=. python experiments/quality/compensate_v.py --model smollm2 --prefill 4096 --decode 256 \\
        --key-ratios 0 --value-ratios 0.5,0.75 --grid axes --policies attention+query_k+weighted_v
"""
import sys

import torch

import hierasparse_gen.simulate as simulate
from hierasparse_gen.cli import main
from hierasparse_gen.format import prune_2to4


def _prune_v(x, weight=None):  # the weighted 2:4 choice alone (the package's prune_v now compensates)
    return prune_2to4(x, -2, weight)

ALL = "--all-blocks" in sys.argv


def prune_v_compensated(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    pruned = _prune_v(x, weight)
    if weight is None:
        if not ALL:
            return pruned
        weight = torch.ones_like(x[..., :1])
    w = weight.to(torch.float32).expand_as(x)               # [..., L, D]
    if not ALL and bool((w == w[..., :1, :]).all()):
        return pruned
    m = w * w                                               # expected probabilities (up to a constant)
    xf, pf = x.float(), pruned.float()
    shape = (*x.shape[:-2], x.shape[-2] // 4, 4, x.shape[-1])
    xg, pg, mg = xf.reshape(shape), pf.reshape(shape), m.reshape(shape)
    kept = pg != 0
    kept = kept | ((xg == 0) & (kept.sum(-2, keepdim=True) < 2))  # a kept zero stays kept
    r = (torch.where(kept, 0.0, mg * xg)).sum(-2, keepdim=True)
    mk = torch.where(kept, mg, 0.0)
    d = r * mk / (mk * mk).sum(-2, keepdim=True).clamp(min=1e-30)
    bound = xg.abs().amax(-2, keepdim=True)
    out = torch.where(kept, pg + d.clamp(-bound, bound), 0.0)
    return out.reshape(x.shape).to(x.dtype)


if __name__ == "__main__":
    simulate.prune_v = prune_v_compensated
    sys.exit(main(["eval", *[a for a in sys.argv[1:] if a != "--all-blocks"]]))
