"""Which eligible blocks become 2:4, and which pairs a 2:4 block keeps: the cache's selection
policies, in plain torch (CPU or GPU), shared by HieraCache (on its GPU) and SimulatedCache.

A block's score says how much pruning it would cost; the blocks of least score become 2:4,
the same count per head as the ratio gives (so pools stay sized up front).

* ``prune_loss``: the summed |x| that 2:4 drops (the paper's choice). Needs only K/V.
* ``attention``: the attention mass that the prompt's last ``observe`` queries put on the block,
  per KV head (summed over its group's query heads): blocks that attention reads stay dense.
* ``expected_error``: attention mass times prune loss, a first-order proxy of the output change.
* ``output_error`` (the simulation's only, a study policy): the output change itself, to first order, that
  pruning the block would cause for the observation window's queries (summed squared norm): for V,
  sum_t p_t (v_t - v^_t); for K, sum_t p_t ds_t (v_t - o), ds_t the score change of the pruned key. It sees
  which entries 2:4 drops and how they cancel, where mass x loss sees only sizes. Scored in torch: no
  better than ``attention`` on SmolLM2 and 1.4-1.9x the prompt's attention to fill at 32K, so the GPU cache
  refuses it.
* ``auto`` (the default): ``attention`` when the prefill brings the prompt's queries (``q`` or
  ``select_q``; the transformers integration always does), else ``prune_loss``; likewise
  ``key_channels="auto"`` weighs K's channels and ``value_tokens="auto"`` V's tokens (below) when the
  queries are there.

Inside a 2:4 block (``key_channels="query"``), K keeps per token the 2 of 4 channels of largest
|k_c| * E|q_c| (the observation window's mean |q| per channel and KV head) instead of the largest
|k_c|: a dropped channel moves a score by q_c * k_c, so channels that queries barely use go
first. Same storage format, same kernels: only the choice of kept channels changes. Likewise
``value_tokens="attention"``: V keeps per channel the 2 of 4 tokens of largest |v| * sqrt(a_t), a_t the
token's attention mass from the observation window (normalized to mean 1 over the prompt; the square root
hedges for the later queries the window does not see: measured against a_t itself, a_t^0.25 and a_t + 0.1 on
SmolLM2, benchmarks/RESULTS.md run Q9), for every token of the prompt: the blocks eligible at the
prompt, and the prompt's window blocks when they leave the window (the cache keeps their weights;
on SmolLM2 at V ratio 0.5 this took KL from 0.0204 to 0.0165, run Q11). Tokens after the prompt
weigh 1. The kept pair of each group then also carries what the dropped pair did under the expected
attention m_t = w_t^2 (format.compensate_v: the least change of the two kept values that leaves the group's
m-weighted sum unchanged, clipped to the group's largest |v|; groups of 4 equal weights are only pruned): same
storage, the values differ. Both choices run in both caches: the GPU fill kernel takes K's channel and V's
token weights, the append kernel K's channel weights and the window blocks' token weights.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .format import block_prune_loss, prune_k, prune_v

SELECTIONS = ("auto", "prune_loss", "attention", "expected_error", "output_error")
#: selections of the simulation alone (SimulatedCache, the eval's simulate backend), for studies
STUDY_SELECTIONS = ("output_error",)
#: "auto": the measured best (benchmarks/RESULTS.md: as good as output_error, at a seventh of its fill time) when
#: the prefill brings its queries, else prune loss
AUTO_WITH_QUERIES = "attention"
KEY_CHANNELS = ("auto", "magnitude", "query")
VALUE_TOKENS = ("auto", "magnitude", "attention")


def check_selection(selection: str, key_channels: str, observe: int, value_tokens: str = "auto",
                    simulation: bool = False) -> None:
    """Refuse an unknown choice, and a study selection outside the simulation (``simulation``: SimulatedCache)."""
    if selection not in SELECTIONS:
        raise InputError(f"selection {selection!r} is not a block selection. Fix: use one of {', '.join(SELECTIONS)}")
    if selection in STUDY_SELECTIONS and not simulation:
        raise InputError(f"selection {selection!r} is a study policy of the simulation only (SimulatedCache, "
                         f"backend='simulate'): scored in torch, filling a 32K prompt with it costs 1.4-1.9x the "
                         f"prompt's attention on an H100, and it chooses no better than 'attention' "
                         f"(benchmarks/RESULTS.md). Fix: use selection='attention' (or 'auto'), 'expected_error' or "
                         f"'prune_loss', or backend='simulate' for a study")
    if key_channels not in KEY_CHANNELS:
        raise InputError(f"key_channels {key_channels!r} is not known. Fix: use one of {', '.join(KEY_CHANNELS)}")
    if value_tokens not in VALUE_TOKENS:
        raise InputError(f"value_tokens {value_tokens!r} is not known. Fix: use one of {', '.join(VALUE_TOKENS)}")
    if int(observe) != observe or observe < 1:
        raise InputError(f"observe {observe!r}: the observation window must be a positive number of queries. "
                         f"Fix: e.g. observe=64")


def resolve(selection: str, has_queries: bool) -> str:
    """The selection a prefill runs: "auto" picks by whether the prompt's queries are there."""
    if selection == "auto":
        return AUTO_WITH_QUERIES if has_queries else "prune_loss"
    return selection


def resolve_channels(key_channels: str, has_queries: bool) -> str:
    """K's choice inside a 2:4 block for a prefill: "auto" weighs channels when the queries are there."""
    if key_channels == "auto":
        return "query" if has_queries else "magnitude"
    return key_channels


def resolve_tokens(value_tokens: str, has_queries: bool) -> str:
    """V's choice inside a 2:4 block for a prefill: "auto" weighs tokens by attention when the queries are there."""
    if value_tokens == "auto":
        return "attention" if has_queries else "magnitude"
    return value_tokens


def needs_queries(selection: str, key_channels: str, value_tokens: str = "auto") -> bool:
    return selection not in ("auto", "prune_loss") or key_channels == "query" or value_tokens == "attention"


def observed_queries(q: torch.Tensor, lengths: list[int], observe: int) -> list[torch.Tensor]:
    """Each sequence's last ``observe`` queries of a chunk ``q [B, Hq, L, D]``: ``[Hq, W, D]`` each."""
    return [q[b, :, max(0, n - observe):n] for b, n in enumerate(lengths)]


def token_mass(q_obs: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Attention mass per key ``[Hkv, n]`` (float32) of the last W queries ``q_obs [Hq, W, D]`` of
    a prompt over its keys ``k [Hkv, n, D]``: causal (query i of the window sits at position
    n - W + i), summed over the W queries and each KV head's group."""
    Hq, W, D = q_obs.shape
    Hkv, n = k.shape[0], k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    G = Hq // Hkv
    # only the last W keys can be late for a window query (key n - W + j against query n - W + i: j > i)
    late = torch.arange(W, device=k.device).view(1, W) > torch.arange(W, device=k.device).view(W, 1)
    q = q_obs.reshape(Hkv, G * W, D)
    out = torch.empty(Hkv, n, dtype=torch.float32, device=k.device)
    # KV heads a batch: scores of at most 8M floats (32 MB), so the in-place passes below stay in a GPU's L2
    step = max(1, (1 << 23) // (G * W * n))
    for h in range(0, Hkv, step):
        s = torch.matmul(q[h:h + step].float(), k[h:h + step].float().transpose(1, 2))  # [h, GW, n]
        s.mul_(scale)
        s.view(-1, G, W, n)[..., n - W:].masked_fill_(late, float("-inf"))
        out[h:h + step] = torch.softmax(s, -1).view(-1, G, W, n).sum((1, 2))
    return out


def block_sums(tokens: torch.Tensor, block: int) -> torch.Tensor:
    """Per-token values ``[..., n]`` summed per whole block: ``[..., n // block]`` (none for n under a block)."""
    nb = tokens.shape[-1] // block
    return tokens[..., :nb * block].reshape(*tokens.shape[:-1], nb, block).sum(-1)


def attention_mass(q_obs: torch.Tensor, k: torch.Tensor, block: int, scale: float | None,
                   tokens: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`token_mass` summed per whole block: ``[Hkv, n // block]`` (``tokens``: it, if computed)."""
    return block_sums(token_mass(q_obs, k, scale) if tokens is None else tokens, block)


def visible_block_mass(tokens: torch.Tensor, W: int, block: int) -> torch.Tensor:
    """Per whole block ``[..., n // block]``: the attention mass ``tokens [..., n]`` of the last W queries, per
    query that can see each token (token t is seen by min(W, n - t) of them, so the window's own tokens are
    not made light by the causal mask). The score of decode-time re-tiering."""
    n = tokens.shape[-1]
    seen = torch.clamp(n - torch.arange(n, device=tokens.device), max=W).float()
    return block_sums(tokens / seen, block)


def retier_pick(mass: torch.Tensor, dense: torch.Tensor, leaving: int) -> torch.Tensor:
    """Per head ``[Hkv]``: the block that becomes 2:4 when block ``leaving`` leaves the window and one more
    2:4 block is due: the least ``mass [Hkv, blocks]`` among the dense eligible blocks (``dense [Hkv, blocks]``,
    True for each) and the leaving one; ties go to the leaving block, then to the lowest index (the append
    kernel's rule)."""
    m = torch.where(dense, mass, torch.full_like(mass, float("inf")))
    low = m.amin(-1)
    first = torch.argmax((m == low.unsqueeze(-1)).int(), -1)          # lowest index of the minimum
    keep = mass[:, leaving] <= low                                     # the leaving block is (one of) the least
    return torch.where(keep, torch.full_like(first, leaving), first)


def output_error(q_obs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, scale: float | None, name: str,
                 channel_weight: torch.Tensor | None = None, token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per whole block ``[Hkv, n // block]`` (float32): the summed squared first-order change of the
    outputs of the window's queries ``q_obs [Hq, W, D]`` if that block of ``name`` (K or V, of ``k``/``v``
    ``[Hkv, n, D]``) alone were 2:4 (pruned as the cache prunes it: ``channel_weight [Hkv, 1, D]``,
    ``token_weight [Hkv, n, 1]``)."""
    Hq, W, D = q_obs.shape
    Hkv, n = k.shape[0], k.shape[1]
    G, nb = Hq // Hkv, n // block
    scale = D ** -0.5 if scale is None else scale
    late = torch.arange(n, device=k.device).view(1, n) > torch.arange(n - W, n, device=k.device).view(W, 1)
    out = torch.empty(Hkv, nb, dtype=torch.float32, device=k.device)
    for h in range(Hkv):
        qh = q_obs[h * G:(h + 1) * G].float()                                   # [G, W, D]
        kh, vh = k[h].float(), v[h].float()
        p = torch.softmax(((qh @ kh.T) * scale).masked_fill(late, float("-inf")), -1).reshape(G * W, n)
        pb = p[:, :nb * block]
        if name == "v":
            tw = None if token_weight is None else token_weight[h, :nb * block]
            dv = (vh[:nb * block] - prune_v(vh[:nb * block], tw)).view(nb, block, D)
            delta = torch.einsum("qbs,bsd->qbd", pb.view(G * W, nb, block), dv)
        else:
            cw = None if channel_weight is None else channel_weight[h]
            dk = kh[:nb * block] - prune_k(kh[:nb * block], cw)
            ds = (qh.reshape(G * W, D) @ dk.T) * scale                          # [GW, nb * block]
            o = p @ vh                                                          # [GW, D]
            w = (pb * ds).view(G * W, nb, block)
            delta = torch.einsum("qbs,bsd->qbd", w, vh[:nb * block].view(nb, block, D)) - \
                w.sum(-1, keepdim=True) * o.unsqueeze(1)
        out[h] = delta.pow(2).sum((0, 2))
    return out


def token_weights(tokens: torch.Tensor) -> torch.Tensor:
    """Per-token weights of V's 2:4 choice ``[Hkv, n]``: the square root of the mass normalized to mean 1 per head."""
    return (tokens / tokens.mean(-1, keepdim=True).clamp(min=1e-30)).sqrt()


def mass_stats(tokens: torch.Tensor, W: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a fill reads from the per-key masses ``tokens [..., n]`` of the last W queries: per whole block the
    mass (:func:`block_sums`, the selection's score) and the mass per query that sees it
    (:func:`visible_block_mass`, re-tiering's score), and V's per-token weights (:func:`token_weights`). The
    library's kernel computes the same in one launch (ops.mass_stats)."""
    return block_sums(tokens, block), visible_block_mass(tokens, W, block), token_weights(tokens)


def channel_weights(q_obs: torch.Tensor, heads: int) -> torch.Tensor:
    """E|q_c| per KV head ``[..., Hkv, D]`` (float32) over the window's queries ``[..., Hq, W, D]`` of its group."""
    *lead, Hq, W, D = q_obs.shape
    return q_obs.abs().reshape(*lead, heads, Hq // heads * W, D).mean(-2, dtype=torch.float32)


def block_scores(selection: str, x: torch.Tensor, name: str, block: int, mass: torch.Tensor | None,
                 loss: torch.Tensor | None = None, error: torch.Tensor | None = None) -> torch.Tensor:
    """Score per whole block ``[B, H, L // block]`` of ``x [B, H, L, D]`` (lower: 2:4 first).
    ``mass [B, H, L // block]``: attention mass (attention, expected_error); ``loss``: the prune
    loss when already computed (the GPU scoring kernel's); ``error``: :func:`output_error`."""
    if selection == "attention":
        return mass
    if selection == "output_error":
        return error
    if loss is None:
        loss = block_prune_loss(x, name, block)
    return loss if selection == "prune_loss" else loss * mass


__all__ = ["SELECTIONS", "STUDY_SELECTIONS", "AUTO_WITH_QUERIES", "KEY_CHANNELS", "VALUE_TOKENS", "check_selection", "resolve", "resolve_channels", "resolve_tokens",
           "needs_queries", "observed_queries", "token_mass", "block_sums", "attention_mass", "output_error", "token_weights", "mass_stats",
           "channel_weights", "block_scores"]
