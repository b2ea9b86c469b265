"""Does cuDNN's causal attention (torch's private op, as enable()'s prefill calls it) take GQA, return each row's
natural log-sum-exp under the given scale, and at what cost over the plain call? Llama-3 shape, fp16.

    python experiments/fill_mass/attention_lse.py [--length 32768]
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))
from fill_cost import wall_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    args = ap.parse_args()
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
    for L, scale in ((1000, None), (777, 0.05)):
        q = torch.randn(2, 32, L, 128, device="cuda", dtype=torch.float16) * 2
        k, v = (torch.randn(2, 8, L, 128, device="cuda", dtype=torch.float16) for _ in range(2))
        res = cudnn(q, k, v, None, True, 0.0, True, False, scale=scale)
        out, lse = res[0], res[1]
        s = torch.einsum("bhgqd,bhkd->bhgqk", q.double().view(2, 8, 4, L, 128), k.double())
        s = s * (128 ** -0.5 if scale is None else scale)
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        want = torch.logsumexp(s, -1).reshape(2, 32, L)
        ref = torch.einsum("bhgqk,bhkd->bhgqd", torch.softmax(s, -1), v.double()).reshape(2, 32, L, 128)
        print(f"L={L} scale={scale}: lse {tuple(lse.shape)} {lse.dtype} strides {lse.stride()}; "
              f"max |lse - float64| {(lse.reshape(2, 32, L).double() - want).abs().max().item():.2e}; "
              f"max |out - float64| {(out.double() - ref).abs().max().item():.2e}")
    L = args.length
    q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(1, 8, L, 128, device="cuda", dtype=torch.float16) for _ in range(2))

    def plain():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for name, fn in (("SDPA cuDNN", plain), ("cuDNN op, no lse", lambda: cudnn(q, k, v, None, False, 0.0, True, False)),
                     ("cuDNN op with lse", lambda: cudnn(q, k, v, None, True, 0.0, True, False)), ("SDPA cuDNN", plain)):
        print(f"{torch.cuda.get_device_name()} L={L}: {name} {wall_ms(fn):.3f} ms")


if __name__ == "__main__":
    main()
