"""Plot predicted against measured speedup from a saved ``bench/costmodel.py --out`` file.

    python bench/plot_costmodel.py bench/costmodel_h100_full.json bench/plots/costmodel_h100.png

Needs matplotlib (only for this plot; sparsecc itself does not depend on it).
"""

import json
import sys


def main(src: str, dst: str) -> None:
    """Scatter of predicted vs measured speedup, one colour per kernel family, log-log, with the y = x line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(src) as fh:
        data = json.load(fh)
    fig, ax = plt.subplots(figsize=(6, 5))
    families = sorted({r["sparse_family"] for r in data["rows"]})
    for fam in families:
        rows = [r for r in data["rows"] if r["sparse_family"] == fam]
        ax.scatter([r["measured"] for r in rows], [r["predicted"] for r in rows], label=fam, s=18)
    lo = min(min(r["measured"], r["predicted"]) for r in data["rows"]) * 0.8
    hi = max(max(r["measured"], r["predicted"]) for r in data["rows"]) * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = measured")
    ax.axhline(1.05, color="grey", lw=0.5)
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured speedup over dense")
    ax.set_ylabel("predicted speedup over dense")
    s = data["summary"]
    ax.set_title(f"sparsecc cost model, {data['device']}\nmedian error {s['median_abs_error']:.1%}, "
                 f"within 5% of best {s['share_within_5pct']:.1%}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
