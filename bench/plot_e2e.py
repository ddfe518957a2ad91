"""Plot bench/e2e.py rows: prefill speedup over eager by length (one panel per layer count), decode tokens/s.

    python bench/plot_e2e.py bench/e2e_h100.json bench/plots/e2e_h100.png

matplotlib is a bench-only dependency; bench/e2e.py --write calls :func:`plot`.
"""

from __future__ import annotations

import json
import sys
from typing import List


def plot(rows: List[dict], path: str) -> None:
    """Write the figure to ``path``: x eager against prefill length per config, and decode x eager per KV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefill = [r for r in rows if r["kind"] == "prefill" and r.get("x_eager")]
    decode = [r for r in rows if r["kind"] == "decode" and r.get("x_eager")]
    layer_counts = sorted({r["layers"] for r in prefill})
    panels = len(layer_counts) + (1 if decode else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5 * max(panels, 1), 4), squeeze=False)
    for ax, layers in zip(axes[0], layer_counts):
        mine = [r for r in prefill if r["layers"] == layers]
        for config in dict.fromkeys(r["config"] for r in mine):
            pts = sorted((r["seq"], r["x_eager"]) for r in mine if r["config"] == config)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=config)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prefill tokens")
        ax.set_ylabel("x eager (higher is faster)")
        ax.set_title(f"prefill, {layers} layers")
        ax.legend(fontsize=8)
    if decode:
        ax = axes[0][-1]
        kvs = sorted({r["kv"] for r in decode})
        configs = list(dict.fromkeys(r["config"] for r in decode))
        width = 0.8 / len(configs)
        for i, config in enumerate(configs):
            vals = [next((r["x_eager"] for r in decode if r["kv"] == kv and r["config"] == config), 0) for kv in kvs]
            ax.bar([j + i * width for j in range(len(kvs))], vals, width, label=config)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kvs))], [f"KV {kv}" for kv in kvs])
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("x eager per token")
        ax.set_title("decode, batch 1")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        plot(json.load(fh)["rows"], sys.argv[2])
