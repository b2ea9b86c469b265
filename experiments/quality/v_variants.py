"""Study: two cheap variants of the default's V choice, each run through the evaluation.

* ``--visible-weights``: V's token weights from the attention mass per observation query that can see the token
  (token t of an n-token prompt is seen by min(W, n - t) of the last W queries), as re-tiering's block score
  already does, instead of the raw mass, which makes the prompt's last tokens look light.
* policies ``default@32`` / ``default@128``: the default with an observation window of 32 or 128 queries (64 is
  the default).

    PYTHONPATH=. python experiments/quality/v_variants.py [--visible-weights] --model smollm2 --prefill 4096 \\
        --decode 256 --key-ratios 0 --value-ratios 0.5,0.75 --grid axes --policies attention+query_k+weighted_v
"""
import sys

import torch

import hierasparse_gen.simulate as sim
from hierasparse_gen.cli import main
from hierasparse_gen.evaluate import quality

for w in (32, 128):
    quality.POLICIES[f"default@{w}"] = {**quality.POLICIES["attention+query_k+weighted_v"], "observe": w}

if "--visible-weights" in sys.argv:
    sys.argv.remove("--visible-weights")
    _fresh = sim.SimulatedCache._fresh

    def fresh(self, b, k, v, q_obs, scale):
        if q_obs is not None:
            W = q_obs.shape[1]

            def weights(tokens):
                n = tokens.shape[1]
                t = tokens / torch.clamp(n - torch.arange(n, device=tokens.device), max=W).float()
                return (t / t.mean(-1, keepdim=True).clamp(min=1e-30)).sqrt()
            sim.token_weights = weights
        _fresh(self, b, k, v, q_obs, scale)

    sim.SimulatedCache._fresh = fresh

sys.exit(main(["eval"] + sys.argv[1:]))
