"""Study: other ways to pool the observation window's attention into a token's mass (selection.token_mass sums
the softmax rows of the last W queries of every query head of the KV head's group). Each variant replaces
token_mass for the whole run (block choice, V's token weights and re-tiering all read it):

* ``--mass ramp``: query i of the window (i = 0 oldest) weighs (i + 1) / W: decode queries resemble the newest ones;
* ``--mass headmax``: per query, the largest probability over the group's heads, then summed over the window (a
  token one head needs counts fully).

    PYTHONPATH=. python experiments/quality/mass_variants.py --mass ramp --model smollm2 --prefill 4096 \\
        --decode 256 --key-ratios 0 --value-ratios 0.5,0.75 --grid axes --policies attention+query_k+weighted_v
"""
import sys

import torch

import hierasparse_gen.cache as cache_module
import hierasparse_gen.selection as selection
import hierasparse_gen.simulate as simulate
from hierasparse_gen.cli import main


def pooled_mass(how):
    def token_mass(q_obs, k, scale):
        Hq, W, D = q_obs.shape
        Hkv, n = k.shape[0], k.shape[1]
        scale = D ** -0.5 if scale is None else scale
        G = Hq // Hkv
        late = torch.arange(n, device=k.device).view(1, n) > torch.arange(n - W, n, device=k.device).view(W, 1)
        s = torch.matmul(q_obs.reshape(Hkv, G, W, D).float(), k.float().unsqueeze(1).transpose(2, 3)) * scale
        p = torch.softmax(s.masked_fill(late, float("-inf")), -1)                 # [Hkv, G, W, n]
        if how == "ramp":
            ramp = torch.arange(1, W + 1, device=k.device, dtype=torch.float32) / W
            return (p * ramp.view(1, 1, W, 1)).sum((1, 2))
        return p.amax(1).sum(1)                                                   # headmax
    return token_mass


if __name__ == "__main__":
    i = sys.argv.index("--mass")
    how = sys.argv[i + 1]
    del sys.argv[i:i + 2]
    fn = pooled_mass(how)
    for module in (selection, simulate, cache_module):
        module.token_mass = fn
    sys.exit(main(["eval"] + sys.argv[1:]))
