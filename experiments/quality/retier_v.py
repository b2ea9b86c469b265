"""Study (the prototype of what SimulatedCache and the append kernel now do by default): decode-time re-tiering by score. When a block leaves the window and the ratio asks for one more 2:4 block,
the cache makes that block 2:4 (by count). Here, per head, the block of least attention mass among the held dense
eligible blocks and the leaving one becomes 2:4 instead (a held block is compressed then, the leaving one stays
dense): the per-sequence budget is the same, so the pools stay sized up front. Masses come from the prompt's last
queries (the prompt's blocks, window included; per query that can see a token, since the window's own tokens
are seen by fewer of them); blocks of generated tokens have none and stay dense. Runs the
evaluation with that simulation:

    PYTHONPATH=. python experiments/quality/retier_v.py --model smollm2 --prefill 4096 --decode 256 \\
        --key-ratios 0 --value-ratios 0.5,0.75 --grid axes --policies attention+weighted_v
"""
import sys

import torch

from hierasparse_gen.cli import main
from hierasparse_gen.policy import ratio_count
from hierasparse_gen.selection import token_mass
from hierasparse_gen.simulate import SimulatedCache

_fresh = SimulatedCache._fresh


def fresh(self, b, k, v, q_obs, scale):
    _fresh(self, b, k, v, q_obs, scale)
    if not hasattr(self, "block_mass"):
        self.block_mass = torch.full((self.batch, self.heads, self.max_blocks), float("inf"), device=self.device)
    if q_obs is not None:
        # mass per query that can see the token: the window's own tokens are seen by fewer of its queries
        L, W, S = k.shape[1], q_obs.shape[1], self.block
        seen = torch.clamp(L - torch.arange(L, device=k.device), max=W).float()
        m = token_mass(q_obs, k, scale) / seen
        nb = L // S
        self.block_mass[b, :, :nb] = m[:, :nb * S].reshape(self.heads, nb, S).sum(-1)


def push(self, b, k, v, decode=False):  # (re-tiers at every flush, chunk flushes included)
    for i in range(k.shape[1]):
        pos = self.lengths[b]
        for name, x in (("k", k), ("v", v)):
            self.x[name][b, :, pos] = x[:, i]
            self.stored[name][b, :, pos] = x[:, i]
        self.lengths[b] = pos + 1
        if self.lengths[b] % self.block:
            continue
        blk = self.lengths[b] // self.block - self.window_blocks - 1
        if blk < self.sink_blocks:
            continue
        self.n_eligible[b] += 1
        first, last = self.sink_blocks, self.sink_blocks + self.n_eligible[b]   # eligible: [first, last)
        for name in "kv":
            changed = {blk}
            if self.n_sparse[name][b] < ratio_count(self.ratio[name], self.n_eligible[b]):
                mass = getattr(self, "block_mass", None)
                if mass is None:
                    self.sparse[name][b, :, blk] = True
                else:  # per head: the least mass among dense eligible blocks (the leaving one included)
                    cand = mass[b, :, first:last].clone()
                    cand[self.sparse[name][b, :, first:last]] = float("inf")
                    pick = cand.argmin(-1) + first                      # [H]
                    self.sparse[name][b, torch.arange(self.heads), pick] = True
                    changed |= set(pick.tolist())
                self.n_sparse[name][b] += 1
            for c in sorted(changed):
                self._restore(name, b, c * self.block, (c + 1) * self.block)


if __name__ == "__main__":
    SimulatedCache._fresh = fresh
    SimulatedCache._push = push
    sys.exit(main(["eval", *sys.argv[1:]]))
