"""Plot benchmarks/e2e_generate.py results (JSON) as three panels: time to first token, time
per output token and peak memory against prompt length.

    python benchmarks/plot_e2e.py benchmarks/e2e_h200.json benchmarks/e2e_h200.png
"""

import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"dense": "dense SDPA (transformers default)",
          "balanced/eager": "2:4, balanced prefill (eager decode)",
          "compress_then_attend/eager": "2:4, compress-then-attend (eager decode)",
          "attend_then_compress/eager": "2:4, attend-then-compress (eager decode)",
          "attend_then_compress/graph": "2:4, attend-then-compress (CUDA-graph decode)",
          "dense-kv/graph": "dense KV, same kernels (CUDA-graph decode)"}


def main(src: str, dst: str) -> None:
    rows = defaultdict(dict)
    for r in json.load(open(src)):
        if "error" not in r:
            rows[r["row"]][r["prompt"]] = r
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for (key, title, unit) in zip(("ttft_s", "tpot_ms", "peak_gib"),
                                  ("time to first token", "time per output token", "peak GPU memory"),
                                  ("s", "ms", "GiB")):
        ax = axes[["ttft_s", "tpot_ms", "peak_gib"].index(key)]
        for row, by_len in rows.items():
            lens = sorted(by_len)
            ax.plot([n // 1024 for n in lens], [by_len[n][key] for n in lens], marker="o",
                    label=LABELS.get(row, row))
        ax.set_xlabel("prompt (K tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Llama-3.1-8B shape (random weights), fp16, batch 1, 100 new tokens, H200")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
