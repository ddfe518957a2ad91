"""Plot prefill speedup over dense SDPA against sequence length, per mask, with the ideal line.

    python bench/plot_attention.py attention_rows.json bench/plots/attention_h100.png

The input is the ``--json`` file of ``bench/attention.py``. Needs matplotlib
(only for this plot; sparsecc itself does not depend on it).
"""

import json
import sys

# (row kind, KV heads) -> legend label; D=128 prefill rows only.
SERIES = {("stream", 32): "sink 128 + window 4096, Hkv=32", ("stream", 8): "sink 128 + window 4096, Hkv=8",
          ("random", 32): "random blocks ~10%, Hkv=32", ("dense", 32): "dense spec"}


def main(src: str, dst: str) -> None:
    """One line per mask (measured, solid) and its ideal (1 / kept share of causal blocks, dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(src) as fh:
        data = json.load(fh)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (kind, hkv), label in SERIES.items():
        rows = sorted((r for r in data["rows"] if r.get("kind") == kind and r.get("hkv") == hkv
                       and r.get("d") == 128), key=lambda r: r["s"])
        if not rows:
            continue
        xs = [r["s"] for r in rows]
        line, = ax.plot(xs, [r["sdpa"] / r["ours"] for r in rows], "o-", label=label)
        if kind != "dense":
            ax.plot(xs, [1 / r["density"] for r in rows], "--", color=line.get_color(), lw=0.8,
                    label=f"ideal ({label.split(',')[0]})" if hkv == 32 else None)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks([r for r in sorted({r["s"] for r in data["rows"] if r.get("kind") != "decode"})])
    ax.set_xticklabels([f"{x // 1024}K" for x in ax.get_xticks()])
    ax.set_xlabel("sequence length (B=1, H=32, D=128, causal, bf16)")
    ax.set_ylabel("speedup over dense SDPA")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_title("sparsecc prefill attention, " + data["header"][0].lstrip("- ").split(",")[0], fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
