"""Two builds' block-table decode (HieraCache.attend) on the same caches' contents, alternated over rounds, so a
2-5 % difference stands out of the run-to-run spread (one library timed in two single-round runs differed by up to
2.6 % a cell on the H100). Llama-3 shape, B=8, L=32K, e4m3 K and V unless --storage says otherwise.

    python experiments/fp8_tiles/ab_table.py BUILD_A BUILD_B [--rounds 5] [--cells 0.5/0.5,1/1,0/0]
"""
import argparse
import statistics

import torch

import hierasparse_gen
from hierasparse_gen.bench import median_us
from hierasparse_gen.cache import HieraCache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--cells", default="0/0,0.5/0.5,0/1,1/0,0.5/1,1/1", help="key/value ratio pairs")
    ap.add_argument("--storage", default="float8_e4m3/float8_e4m3")
    args = ap.parse_args()
    libs = [hierasparse_gen.load(p) for p in (args.a, args.b)]
    ks, vs = args.storage.split("/")
    B, L, hq, hkv, d = 8, 32768, 32, 8, 128
    k, v = (torch.randn(B, hkv, L, d, device="cuda", dtype=torch.float16) for _ in range(2))
    qs = [torch.randn(B, hq, d, device="cuda", dtype=torch.float16) for _ in range(2)]
    print(f"{torch.cuda.get_device_name()}: B={B} L={L} storage {args.storage}, {args.rounds} rounds alternating "
          f"A={args.a} and B={args.b}, median over rounds (min-max)\n")
    print("| key / value ratio | A us | B us | B / A time | outputs |\n|---|---|---|---|---|")
    for cell in args.cells.split(","):
        kr, vr = map(float, cell.split("/"))
        caches = [[HieraCache(lib, batch=B, num_kv_heads=hkv, head_dim=d, max_seq_len=L, key_ratio=kr,
                              value_ratio=vr, key_storage=ks, value_storage=vs) for _ in range(2)] for lib in libs]
        for pair in caches:
            for c in pair:
                c.prefill(k, v)
        # a change that should keep every bit (same tables, same outputs) says so here
        outs = [pair[0].attend(qs[0])[0] for pair in caches]  # (out, lse)
        same = "same bits" if torch.equal(outs[0], outs[1]) else \
            f"outputs differ (max {(outs[0].float() - outs[1].float()).abs().max().item():.2e})"
        times = [[], []]
        for _ in range(args.rounds):
            for i, pair in enumerate(caches):
                times[i].append(median_us(lambda q, c: c.attend(q), list(zip(qs, pair)), args.iters))
        a, b = (statistics.median(t) for t in times)
        spread = " / ".join(f"{min(t):.1f}-{max(t):.1f}" for t in times)
        print(f"| {kr:g} / {vr:g} | {a:.1f} | {b:.1f} | {b / a:.3f} ({spread}) | {same} |", flush=True)
        del caches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
