"""How results are shown: a progress bar on stderr, the table on stdout, JSON, and the
bytes-versus-quality curve as a PNG (when matplotlib is installed)."""

from __future__ import annotations

import json
import sys
import time


class Progress:
    """A one-line progress bar on stderr (a line per tenth when stderr is not a terminal)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.label = max(1, total), 0, ""
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.last_tenth = -1

    def set(self, label: str) -> None:
        self.label = label
        self._draw()

    def tick(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        frac = self.done / self.total
        spent = time.monotonic() - self.start
        eta = spent / frac - spent if frac > 0 else 0.0
        bar = "#" * int(frac * 30)
        line = f"[{bar:<30}] {self.done}/{self.total} {self.label} {spent:.0f}s, ~{eta:.0f}s left"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            self.stream.flush()
        elif int(frac * 10) != self.last_tenth:
            self.last_tenth = int(frac * 10)
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _passkey_summary(row: dict) -> str:
    acc = row.get("passkey")
    if not acc:
        return "-"
    return f"{sum(a['accuracy'] for a in acc) / len(acc):.2f}"


def storage(row: dict) -> str:
    """K's and V's storage of a result row, "model/e4m3"-style (rows written before storage: model/model)."""
    return "/".join("e4m3" if s == "float8_e4m3" else s
                    for s in (row.get("key_storage", "model"), row.get("value_storage", "model")))


def table(result: dict) -> str:
    """The results as a fixed-width table (one row per setting, the dense reference first)."""
    head = (f"{'policy':<11} {'k':>5} {'v':>5} {'store k/v':<11} {'sink':>5} {'win':>5} {'prefill':<21} {'B/token':>9} "
            f"{'bytes':>6} {'nll':>7} {'ppl':>8} {'ppl/dense':>9} {'KL':>8} {'top1':>6} {'passkey':>7}")
    lines = [head, "-" * len(head)]
    d = result["dense"]
    lines.append(f"{'dense':<11} {'-':>5} {'-':>5} {'-':<11} {'-':>5} {'-':>5} {'-':<21} {d['bytes_per_token']:>9.0f} "
                 f"{1.0:>6.3f} {d['nll']:>7.4f} {d['ppl']:>8.3f} {1.0:>9.4f} {0.0:>8.5f} {1.0:>6.3f} "
                 f"{_passkey_summary(d):>7}")
    for r in result["rows"]:
        lines.append(f"{r['policy']:<11} {r['key_ratio']:>5g} {r['value_ratio']:>5g} {storage(r):<11} {r['sink']:>5} "
                     f"{r['window']:>5} {r['prefill_mode']:<21} {r['bytes_per_token']:>9.0f} "
                     f"{r['bytes_fraction']:>6.3f} {r['nll']:>7.4f} {r['ppl']:>8.3f} {r['ppl_ratio']:>9.4f} "
                     f"{r['kl']:>8.5f} {r['top1']:>6.3f} {_passkey_summary(r):>7}")
    lines.append("")
    lines.append(f"bytes: the cache's bytes per token over all layers (16-bit model dtype, e4m3 blocks at a byte a "
                 f"value plus float16 per-token scales, block table included), "
                 f"as a fraction of dense; nll/ppl/KL/top1 over {result['decode']} teacher-forced decode tokens "
                 f"after a {result['prefill']}-token prefill; passkey: mean accuracy over lengths and depths")
    return "\n".join(lines)


def passkey_table(result: dict) -> str:
    """Passkey accuracy per (length, depth): one line per setting."""
    dense = result["dense"].get("passkey")
    if not dense:
        return ""
    cols = [f"{a['length']}@{a['depth']:g}" for a in dense]
    width = max(9, *(len(c) for c in cols))
    lines = [f"{'setting':<36} " + " ".join(f"{c:>{width}}" for c in cols)]
    lines.append(f"{'dense':<36} " + " ".join(f"{a['accuracy']:>{width}.2f}" for a in dense))
    for r in result["rows"]:
        name = f"{r['policy']} k{r['key_ratio']:g} v{r['value_ratio']:g} {storage(r)}"
        lines.append(f"{name:<36} " + " ".join(f"{a['accuracy']:>{width}.2f}" for a in r["passkey"]))
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def plot(result: dict, path: str) -> str | None:
    """Perplexity ratio (and KL) against bytes per token; returns why not, when it cannot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (f"no plot written to {path}: matplotlib is not installed. Fix: pip install matplotlib "
                f"(or the eval extra: pip install 'hierasparse-gen[eval]')")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        series.setdefault((r["policy"], r["prefill_mode"], storage(r)), []).append(r)
    dense_bpt = result["dense"]["bytes_per_token"]
    for (policy, mode, store), rows in series.items():
        for tag, pick in (("K", lambda r: r["value_ratio"] == 0), ("V", lambda r: r["key_ratio"] == 0),
                          ("K+V", lambda r: r["key_ratio"] > 0 and r["value_ratio"] > 0)):
            pts = sorted((r for r in rows if pick(r)), key=lambda r: r["bytes_per_token"])
            if not pts:
                continue
            xs = [r["bytes_per_token"] for r in pts]
            label = (f"{policy} {tag}" + ("" if store == "model/model" else f" {store}")
                     + ("" if mode == "attend_then_compress" else f" ({mode})"))
            ax1.plot(xs, [r["ppl_ratio"] for r in pts], marker="o", label=label)
            ax2.plot(xs, [max(r["kl"], 1e-9) for r in pts], marker="o", label=label)
            for r in pts:
                ax1.annotate(f"k{r['key_ratio']:g} v{r['value_ratio']:g}", (r["bytes_per_token"], r["ppl_ratio"]),
                             fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax1.axvline(dense_bpt, color="gray", lw=0.8, ls="--")
    ax1.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax1.set_xlabel("KV-cache bytes per token (all layers)")
    ax1.set_ylabel("perplexity / dense")
    ax2.set_xlabel("KV-cache bytes per token (all layers)")
    ax2.set_ylabel("mean KL(dense || sparse)")
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: prefill {result['prefill']}, decode {result['decode']}, {result['backend']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
