"""Study: reorder a 2:4 V block's tokens before pruning, so that each group of 4 holds 2 heavy and 2 light tokens.

V is 2:4 along tokens: per channel, each group of 4 consecutive tokens keeps 2. Attention over cached tokens does
not depend on their order once K and V rows move together (RoPE is already in K), so a block may be stored in any
token order. Here the tokens of each weighted block (per head) are ranked by their weight (sqrt of the prompt
window's attention mass) and group j gets ranks 2j, 2j+1, S/2+2j, S/2+2j+1: the heavier half spread two to a group,
so each keeps its values in (nearly) every channel. Simulated by pruning in that order and putting the kept values
back in token order (the same attention as permuting K and V alike). Blocks whose weights are all equal keep their
order. Runs the evaluation with that pruning:

    PYTHONPATH=. python experiments/quality/reorder_v.py --model smollm2 --prefill 4096 --decode 256 \\
        --key-ratios 0 --value-ratios 0.5,0.75 --grid axes --policies attention+weighted_v
"""
import sys

import torch

import hierasparse_gen.simulate as simulate
from hierasparse_gen.cli import main

_prune_v = simulate.prune_v
BLOCK = 64


def _order(w: torch.Tensor) -> torch.Tensor:
    """Token order of one block per head (``w [H, S]``): ranks 2j, 2j+1, S/2+2j, S/2+2j+1 form group j."""
    H, S = w.shape
    rank = torch.argsort(w, dim=-1, descending=True, stable=True)          # [H, S]: token of each rank
    j = torch.arange(S // 4)
    slots = torch.stack([2 * j, 2 * j + 1, S // 2 + 2 * j, S // 2 + 2 * j + 1], -1).flatten()  # rank at position
    return rank[:, slots]                                                   # [H, S]: token at each position


def prune_v_reordered(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    if weight is None or x.shape[-2] % BLOCK:
        return _prune_v(x, weight)
    H, n, D = x.shape
    out = _prune_v(x, weight)
    w = weight[..., 0] if weight.dim() == 3 else weight
    for b0 in range(0, n, BLOCK):
        wb = w[:, b0:b0 + BLOCK]
        if bool((wb == wb[:, :1]).all()):
            continue
        order = _order(wb)                                                  # [H, S]
        xb = torch.gather(x[:, b0:b0 + BLOCK], 1, order.unsqueeze(-1).expand(H, BLOCK, D))
        wp = torch.gather(wb, 1, order).unsqueeze(-1)
        pruned = _prune_v(xb, wp)
        back = torch.empty_like(pruned)
        back.scatter_(1, order.unsqueeze(-1).expand(H, BLOCK, D), pruned)
        out[:, b0:b0 + BLOCK] = back
    return out


if __name__ == "__main__":
    simulate.prune_v = prune_v_reordered
    sys.exit(main(["eval", *sys.argv[1:]]))
