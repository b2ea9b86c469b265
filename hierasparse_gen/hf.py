"""Hugging Face transformers integration: sparse-KV attention for Llama, Mistral, Qwen3 and
other models whose attention layers call ``cache.update`` and the attention-function registry.

``enable(model, lib, key_ratio=..., value_ratio=...)`` registers the ``"hierasparse"``
attention function (and a mask function: the kernels are causal by construction and need
only the padding), switches the model to it, and makes ``generate()`` build a
:class:`HieraSparseCache` (one :class:`~hierasparse_gen.cache.HieraCache` per layer) unless one
is passed. No model code is edited.

How a layer runs: the model calls ``cache.update(k, v, layer_idx)``; the cache layer only
records that it is next and hands K/V back; the attention function then inserts them and
attends in one place, because the order depends on the prefill mode (attend-then-compress
attends before inserting). A one-token call is a decode step (append, then attend); longer
calls are prefill chunks. Padded positions (from the 2D attention mask) are dropped: every
sequence of a batch holds only its own tokens.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import HieraCache
from .errors import CacheFullError, InputError, UnsupportedError
from .ops.cache_kernels import check_e4m3_build
from .ops.graphs import capture_graph
from .policy import cache_settings, check_prefill_mode, check_ratios, check_storage
from .selection import check_selection
from .simulate import SimulatedCache
from .tensor_parallel import rank_heads

ATTENTION = "hierasparse"

# The cache layer that the next attention call of each layer index belongs to (set by update).
_PENDING: dict[int, "HieraLayer"] = {}


@dataclass(frozen=True)
class SparseKV:
    """The sparse-KV settings that ``enable`` puts on a model."""
    lib: object                 # a loaded library, or None with backend "simulate"
    key_ratio: float
    value_ratio: float
    sink: int
    window: int
    block_size: int
    prefill_mode: str
    backend: str                # "kernels" | "simulate"
    cuda_graph: bool = False    # decode steps of a forward replay one captured graph (GraphedDecoder)
    selection: str = "auto"     # how eligible blocks are chosen (hierasparse_gen.selection)
    key_channels: str = "auto"
    observe: int = 64
    value_tokens: str = "auto"
    key_storage: str = "model"  # "model" | "float8_e4m3" (the eligible blocks in e4m3; docs/fp8.md)
    value_storage: str = "model"

    def make_store(self, *, batch: int, heads: int, head_dim: int, max_len: int, dtype, device):
        cls = HieraCache if self.backend == "kernels" else SimulatedCache
        storage = {"key_storage": self.key_storage, "value_storage": self.value_storage}
        return cls(self.lib, batch=batch, num_kv_heads=heads, head_dim=head_dim, max_seq_len=max_len,
                   key_ratio=self.key_ratio, value_ratio=self.value_ratio, dtype=dtype, device=device,
                   block_size=self.block_size, sink=self.sink, local_window=self.window,
                   selection=self.selection, key_channels=self.key_channels, observe=self.observe,
                   value_tokens=self.value_tokens, **storage)


class HieraLayer(CacheLayerMixin):
    """One layer: a HieraCache (or its torch simulation), created at the first update."""
    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "HieraSparseCache", layer_idx: int):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.store = None
        self.seen = 0  # positions processed, padding included (what the model's masks count)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        if B != self.owner.batch:
            raise InputError(f"the cache was built for batch {self.owner.batch}, the model runs batch {B}. "
                             f"Fix: build the HieraSparseCache with batch_size={B}")
        self.store = self.owner.settings.make_store(batch=B, heads=H, head_dim=D, max_len=self.owner.capacity,
                                                    dtype=key_states.dtype, device=key_states.device)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.store is None:
            self.lazy_initialization(key_states, value_states)
        _PENDING[self.layer_idx] = self
        if not _capturing():  # replays are counted by advance()
            self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self, *args) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.owner.capacity

    def reset(self) -> None:
        if self.store is not None:
            self.store.reset()
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise UnsupportedError("beam search reorders the cache, which a sparse KV cache does not support. "
                                  "Fix: generate with num_beams=1")

    def offload(self):
        raise UnsupportedError("offloading a sparse KV cache is not supported. Fix: keep it on the GPU")


class HieraSparseCache(Cache):
    """A transformers ``Cache`` of one sparse KV cache per decoder layer, ``max_cache_len``
    tokens per sequence (prompt + new tokens)."""

    def __init__(self, settings: SparseKV, *, num_layers: int, batch_size: int, max_cache_len: int):
        if batch_size < 1 or max_cache_len < 1:
            raise InputError(f"batch_size {batch_size} and max_cache_len {max_cache_len} must be positive. "
                             f"Fix: pass sizes of at least 1")
        self.settings, self.batch, self.capacity = settings, batch_size, max_cache_len
        self.decoder = None  # GraphedDecoder, made at the first graphed decode step
        super().__init__(layers=[HieraLayer(self, i) for i in range(num_layers)])

    def advance(self, steps: int) -> None:
        """Account for ``steps`` decode steps replayed from a captured graph (which ran no Python)."""
        for layer in self.layers:
            layer.seen += steps
            if isinstance(layer.store, HieraCache):  # replays moved the device state only
                layer.store._stale = True


# --- the attention and mask functions ----------------------------------------------------------

def _capturing() -> bool:
    if torch.compiler.is_compiling():  # compiled code is not captured here (and dynamo cannot ask)
        return False
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _dense_causal(query, key, value, scaling, padding=None):
    """Causal SDPA of one whole sequence batch; ``padding [B, L]`` (True = token) masks padded
    keys (a padded query attends only to itself, so no row is empty and nothing turns NaN)."""
    gqa = key.shape[1] != query.shape[1]
    if padding is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling,
                                              enable_gqa=gqa)
    L = query.shape[2]
    eye = torch.eye(L, dtype=torch.bool, device=query.device)
    allowed = (eye.logical_not().tril() & padding.view(-1, 1, 1, L)) | eye
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=gqa)


_NO_CUDNN_LSE: set = set()  # (dtype, head_dim, device) this torch's cuDNN attention refused: SDPA, without the lse


def _dense_causal_lse(query, key, value, scaling):
    """Causal attention of a whole unpadded batch and its rows' natural log-sum-exp ``[B, Hq, L]`` (float32), which
    a cache fill reads instead of computing it again: cuDNN's attention returns it at no extra cost. Where that
    kernel does not take the call, SDPA's output and None."""
    shape = (query.dtype, query.shape[-1], query.device)
    if query.is_cuda and query.shape[2] > 1 and shape not in _NO_CUDNN_LSE:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, True,
                                                                          False, scale=scaling)[:2]
            B, Hq, L = query.shape[:3]
            if lse.numel() == B * Hq * L:
                return out, lse.reshape(B, Hq, L).float()
        except (RuntimeError, NotImplementedError, TypeError):  # (no cuDNN attention, or another op signature)
            pass
        _NO_CUDNN_LSE.add(shape)
    return _dense_causal(query, key, value, scaling), None


def hierasparse_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The ``"hierasparse"`` attention function: q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]`` (this
    call's tokens only). Returns ``[B, L, Hq, D]`` and no attention weights."""
    layer = _PENDING.pop(getattr(module, "layer_idx", -1), None)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise InputError(f"attention_mask: a {attention_mask.dim()}D mask; hierasparse attention is causal and "
                         f"takes only a 2D padding mask [batch, tokens]. Fix: pass the 2D attention_mask")
    if layer is None:  # no sparse cache in this forward (use_cache=False): nothing to compress
        padding = None
        if attention_mask is not None and attention_mask.dim() == 2 and query.shape[2] > 1:
            padding = attention_mask[:, -query.shape[2]:].to(torch.bool)
        return _dense_causal(query, key, value, scaling, padding).transpose(1, 2), None
    store, settings = layer.store, layer.owner.settings
    B, Hq, L, D = query.shape
    if L == 1:  # a decode step: the token enters the cache, then attends to all of it
        store.append(key[:, :, 0], value[:, :, 0])
        out, _ = store.attend(query[:, :, 0], scale=scaling)
        return out.unsqueeze(1), None
    # a prefill chunk: padded positions (mask False) are dropped, each sequence's tokens first
    valid = None if attention_mask is None else attention_mask[:, -L:].to(torch.bool)
    if valid is not None and bool(valid.all()):
        valid = None
    if valid is not None:
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # valid positions first
        lengths = valid.sum(1).tolist()
        gather = order.view(B, 1, L, 1)
        query, key, value = (x.gather(2, gather.expand(-1, x.shape[1], -1, D)) for x in (query, key, value))
    else:
        lengths = [L] * B
    store.sync()
    fresh = max(store.lengths) == 0
    if settings.prefill_mode == "attend_then_compress" and fresh:
        # exact dense attention over the prompt: the best dense kernel, then compression
        out, lse = _dense_causal_lse(query, key, value, scaling)
        store.prefill(key, value, lengths, select_q=query, scale=scaling, select_lse=lse)
    else:
        out, _ = store.prefill(key, value, lengths, q=query, mode=settings.prefill_mode, scale=scaling)
    if valid is not None:
        rows = torch.arange(L, device=out.device).view(1, L) < torch.tensor(lengths, device=out.device).view(B, 1)
        out = out.masked_fill(~rows.view(B, 1, L, 1), 0)
        out = torch.zeros_like(out).scatter_(2, gather.expand(-1, Hq, -1, D), out)
    return out.transpose(1, 2), None


def hierasparse_mask(batch_size: int, q_length: int, kv_length: int, *args, attention_mask=None, **kwargs):
    """Mask function of the ``"hierasparse"`` implementation: the kernels are causal by
    construction, so only a prefill chunk's 2D padding mask is passed on (else None)."""
    if q_length == 1 or attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask


AttentionInterface.register(ATTENTION, hierasparse_attention)
AttentionMaskInterface.register(ATTENTION, hierasparse_mask)


# --- enable ------------------------------------------------------------------------------------

def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _check_model(config) -> tuple[int, int, int]:
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise InputError(f"{type(config).__name__}: sliding_window={config.sliding_window}; sliding-window "
                         f"attention layers are not supported. Fix: set config.sliding_window = None")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise InputError(f"{type(config).__name__}: layer types {sorted(layer_types)}; only full-attention layers "
                         f"are supported. Fix: use a model whose every layer is full attention (Llama, Mistral "
                         f"without a sliding window, Qwen3)")
    return heads, kv, head_dim


def _check_library(lib, head_dim: int, group: int, block_size: int, dtype, where: str = "") -> None:
    """The library must hold mixed-tier decode and prefill kernels for the model's shape (``where``: which
    heads, when a rank of a tensor-parallel run computes a slice of them)."""
    dt = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype)
    if dt is None:
        raise InputError(f"the model's dtype {dtype} has no kernels. Fix: model.to(torch.float16) or bfloat16")
    for kind in ("decode", "prefill"):
        if not any(v.kind == kind and v.head_dim == head_dim and v.group == group and v.dtype == dt and
                   v.tier == ("mixed", "mixed") and v.block_size == block_size for v in lib.variants):
            raise InputError(f"{lib.path.name} has no {kind} kernel for this model (head_dim {head_dim}, GQA group "
                             f"{group}{where}, {dt}, block table of {block_size}-token blocks). Fix: add "
                             f"{{head_dim: {head_dim}, num_qo_heads: {group}, num_kv_heads: 1}} to the spec's shapes, "
                             f"{dt} to its dtypes, the tier {{k: mixed, v: mixed}} and cache.block_size "
                             f"{block_size}, then rebuild")


def enable(model, lib=None, *, key_ratio: float, value_ratio: float, sink: int | None = None,
           window: int | None = None, block_size: int | None = None,
           prefill_mode: str = "attend_then_compress", backend: str = "kernels", cuda_graph: bool = True,
           selection: str = "auto", key_channels: str = "auto", observe: int = 64,
           value_tokens: str = "auto", key_storage: str = "model", value_storage: str = "model"):
    """Turn ``model`` (a transformers causal LM) to sparse-KV attention; returns the model.

    ``key_ratio``/``value_ratio``: fraction of the eligible blocks (outside sink and window)
    stored 2:4. ``sink``, ``window``, ``block_size`` default to the library spec's ``cache``
    section (64, 256, 64 without one). ``prefill_mode``: one of PREFILL_MODES (see
    HieraCache.prefill). ``backend="simulate"`` runs the pure-torch model of the same cache
    (CPU or GPU, no library): slow, for small models and accuracy studies. ``cuda_graph``
    (kernels backend): one-token forwards with a HieraSparseCache (generate()'s decode steps)
    replay a CUDA graph captured at the first one, instead of running 32 layers of Python.
    ``selection``: which eligible blocks become 2:4 at prefill (:mod:`hierasparse_gen.selection`):
    "auto" (= "attention" here: the blocks the prompt's last ``observe`` queries attend to least),
    "expected_error" (attention mass x prune loss), "prune_loss" (the paper's), or, with backend="simulate"
    only, the study policy "output_error" (the blocks whose pruning would move those queries' outputs least).
    ``key_channels``: "auto" (= "query" here) keeps in K's 2:4 blocks the channels of largest |k| * E|q| (the
    window's mean |q|), "magnitude" the largest |k|.
    ``value_tokens``: "auto" (= "attention" here) keeps in V's 2:4 blocks, per channel, the tokens of
    largest |v| * sqrt(the window's attention mass on them), "magnitude" the largest |v|.
    ``key_storage``/``value_storage``: "model" (the model's dtype) or "float8_e4m3" (the eligible blocks in
    e4m3 with per-token scales, dense or 2:4 by the ratio; docs/fp8.md): the kernels backend needs a library
    built with the tier ``{k: mixed, v: mixed, k_storage: ..., v_storage: ...}``.

    A model loaded tensor-parallel (``distributed_config=DistributedConfig(tp_plan="auto")`` under
    ``torchrun``) is enabled on every rank the same way: each rank's cache and kernels take the heads
    its attention computes (see :mod:`hierasparse_gen.tensor_parallel` and docs/tensor_parallel.md).
    """
    if backend not in ("kernels", "simulate"):
        raise InputError(f"backend {backend!r} is unknown. Fix: use 'kernels' or 'simulate'")
    if backend == "kernels" and lib is None:
        raise InputError("enable(): the kernels backend needs a library. Fix: pass lib=hierasparse_gen.load(...), "
                         "or backend='simulate'")
    check_prefill_mode(prefill_mode, "prefill_mode")
    check_ratios(key_ratio, value_ratio)
    check_selection(selection, key_channels, observe, value_tokens, simulation=backend == "simulate")
    check_storage(key_storage, "key_storage")
    check_storage(value_storage, "value_storage")
    if backend == "kernels" and "float8_e4m3" in (key_storage, value_storage):
        # refused now, not at the first forward, when the library lacks the e4m3 kernels for this model
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        check_e4m3_build(lib, head_dim, model.dtype, key_storage, value_storage)
    block, sink, window = cache_settings(lib, block_size, sink, window)
    heads, kv, head_dim = _check_model(_text_config(model))
    if heads % kv:
        raise InputError(f"{heads} attention heads do not divide into {kv} KV heads. Fix: use a model whose "
                         f"num_attention_heads is a multiple of num_key_value_heads")
    # under a tensor-parallel plan the attention tensors carry this rank's heads, not the config's
    rank = rank_heads(model, heads, kv, head_dim)
    if backend == "kernels":
        where = (f" of this rank's {rank.q_heads} query and {rank.kv_heads} KV heads, tensor-parallel over "
                 f"{rank.tp_size}") if rank.tp_size > 1 else ""
        _check_library(lib, head_dim, rank.group, block, model.dtype, where)
    model._sparse_kv = SparseKV(lib, float(key_ratio), float(value_ratio), sink, window, block, prefill_mode,
                                backend, bool(cuda_graph) and backend == "kernels", selection, key_channels,
                                int(observe), value_tokens, key_storage=key_storage, value_storage=value_storage)
    if "forward" not in vars(model):  # wrap once: decode steps may replay a graph
        model._sparse_kv_forward = model.forward
        model.forward = _graph_forward(model, model.forward)
    model.set_attn_implementation(ATTENTION)
    if "_prepare_cache_for_generation" not in vars(model):  # wrap once: generate() builds our cache
        original = model._prepare_cache_for_generation
        params = inspect.signature(original).parameters
        # transformers renamed generate's cache argument (past_key_values -> cache) in 5.2x
        key = "cache" if 'model_kwargs.get("cache")' in inspect.getsource(original) else "past_key_values"

        def prepare(*args, **kwargs):
            bound = dict(zip(params, args), **kwargs)
            model_kwargs, config = bound["model_kwargs"], bound["generation_config"]
            if (getattr(config, "num_beams", 1) or 1) > 1:
                raise UnsupportedError("beam search reorders the cache, which a sparse KV cache does not "
                                          "support. Fix: generate with num_beams=1")
            if model_kwargs.get(key) is None and config.use_cache is not False:
                # generate() expands the batch for num_return_sequences after this point
                copies = max(1, getattr(config, "num_return_sequences", 1) or 1)
                model_kwargs[key] = make_cache(model, batch_size=bound["batch_size"] * copies,
                                               max_cache_len=bound["max_cache_length"])
            return original(*args, **kwargs)

        model._prepare_cache_for_generation = prepare
    return model


def _graph_forward(model, original):
    """``model.forward`` that sends one-token calls with a HieraSparseCache to the cache's
    GraphedDecoder (when the settings ask for graphs) and everything else to ``original``."""
    fields = CausalLMOutputWithPast.__dataclass_fields__
    cache_field = "cache" if "cache" in fields else "past_key_values"

    @functools.wraps(original)  # generate() reads the signature (logits_to_keep, position_ids)
    def forward(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids", args[0] if args else None)
        plain = any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states", "labels")) or \
            kwargs.get("inputs_embeds") is not None or len(args) > 1
        if (plain or not model._sparse_kv.cuda_graph or not isinstance(cache, HieraSparseCache) or ids is None
                or ids.dim() != 2 or ids.shape[1] != 1 or torch.compiler.is_compiling() or _capturing()):
            return original(*args, **kwargs)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.full((ids.shape[0], 1), cache.get_seq_length(), dtype=torch.long, device=ids.device)
        if getattr(cache, "decoder", None) is None:
            cache.decoder = GraphedDecoder(model, cache)
        logits = cache.decoder.step(ids, pos).unsqueeze(1).clone()  # the graph's buffer is reused
        return CausalLMOutputWithPast(**{"logits": logits, cache_field: cache})

    return forward


def cache_argument(model) -> str:
    """The name of the model's forward argument for the cache (renamed in transformers 5.2x)."""
    forward = getattr(model, "_sparse_kv_forward", model.forward)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def make_cache(model, *, batch_size: int, max_cache_len: int) -> HieraSparseCache:
    """A HieraSparseCache for a model that ``enable`` turned to sparse-KV attention."""
    settings = getattr(model, "_sparse_kv", None)
    if settings is None:
        raise InputError("the model is not sparse-KV enabled. Fix: call hierasparse_gen.hf.enable(model, lib, ...)")
    return HieraSparseCache(settings, num_layers=_text_config(model).num_hidden_layers, batch_size=batch_size,
                            max_cache_len=max_cache_len)


class GraphedDecoder:
    """Decode steps of a sparse-KV model replayed from one captured CUDA graph: the Python of
    32 layers runs once, at capture; each step is one replay (inputs copied into static
    buffers). The cache must already hold the prompt; its length advances on the device.

    >>> dec = GraphedDecoder(model, cache)
    >>> logits = dec.step(next_ids, positions)      # [B, 1] each -> [B, vocab] (static buffer)
    """

    def __init__(self, model, cache: HieraSparseCache):
        if not isinstance(cache, HieraSparseCache) or cache.settings.backend != "kernels":
            raise InputError("GraphedDecoder needs a HieraSparseCache on the kernels backend. Fix: enable the "
                             "model with backend='kernels' and pass the cache make_cache() returns")
        self.model, self.cache = model, cache
        device = next(model.parameters()).device
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros_like(self.ids)
        self.graph, self.logits = None, None
        cache.decoder = self  # one graph per cache

    def _forward(self):
        forward = getattr(self.model, "_sparse_kv_forward", self.model.forward)  # not the graph wrapper
        with torch.no_grad():
            return forward(input_ids=self.ids, position_ids=self.pos, use_cache=True, logits_to_keep=1,
                           **{cache_argument(self.model): self.cache}).logits[:, -1]

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One token per sequence; returns the next-token logits (overwritten by the next step)."""
        self.ids.copy_(input_ids)
        self.pos.copy_(position_ids)
        if self.graph is None:  # the first step runs eagerly (warm-up), then one is captured
            self.graph, logits, self.logits = capture_graph(self._forward)
            return logits
        capacity = self.cache.capacity
        if self.cache.get_seq_length() >= capacity:
            raise CacheFullError(f"the cache holds {capacity} positions per sequence, its capacity; nothing was "
                                 f"written. Fix: build the cache with a larger max_cache_len")
        self.graph.replay()
        self.cache.advance(1)
        return self.logits
