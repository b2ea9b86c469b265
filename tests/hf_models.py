"""Small random-weight transformers models built from configs (no downloads), and a step
runner that feeds a prompt (in chunks) and then tokens one at a time, collecting logits."""

import torch

transformers = __import__("pytest").importorskip("transformers")


def tiny_model(family: str = "llama", *, head_dim: int = 128, heads: int = 8, kv_heads: int = 2, layers: int = 2,
               dtype=torch.float32, device="cpu", seed: int = 0):
    common = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=8192, attn_implementation="sdpa")
    if family == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        config = transformers.MistralConfig(sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(**common)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # larger than the default init, so attention is far from uniform
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


@torch.no_grad()
def run_steps(model, prompt: torch.Tensor, new_tokens: torch.Tensor, cache, *, chunk: int | None = None,
              attention_mask: torch.Tensor | None = None):
    """Logits of the prompt's last position, then of each new token fed one at a time:
    ``[B, 1 + n, vocab]`` (float32). ``chunk`` splits the prompt into prefill chunks."""
    B, L = prompt.shape
    mask = torch.ones(B, L, dtype=torch.long, device=prompt.device) if attention_mask is None else attention_mask
    chunk = chunk or L
    out = []
    for s in range(0, L, chunk):
        e = min(L, s + chunk)
        pos = (mask[:, :e].cumsum(1) - 1).clamp(min=0)[:, s:e]
        logits = model(input_ids=prompt[:, s:e], attention_mask=mask[:, :e], position_ids=pos,
                       past_key_values=cache, use_cache=True).logits
    out.append(logits[:, -1].float())
    for i in range(new_tokens.shape[1]):
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        pos = mask.sum(1, keepdim=True) - 1
        logits = model(input_ids=new_tokens[:, i:i + 1], attention_mask=mask, position_ids=pos,
                       past_key_values=cache, use_cache=True).logits
        out.append(logits[:, -1].float())
    return torch.stack(out, 1)
