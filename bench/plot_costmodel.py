"""Plot predicted against measured speedup from a saved ``bench/costmodel.py --json`` file.

    python bench/plot_costmodel.py rows.json bench/plots/costmodel_h100.png

Reads both this script's current format (rows with a ``site``; a summary per
table: shipped, refit in sample, refit cross-validated) and the older one
(rows with ``sparse_family``; one flat summary). Needs matplotlib (only for
this plot; sparsecc itself does not depend on it).
"""

import json
import sys


def _series(row: dict) -> str:
    """What a point is coloured by: the sparse form (or the older rows' kernel family)."""
    if "sparse_family" in row:
        return row["sparse_family"]
    site = row["site"]
    if site["kind"] == "ffn":
        return f"ffn {site['mode']}"
    form = site.get("form")
    return form["name"] if form else "activation sparsity"


def _title_metrics(summary: dict) -> str:
    """The figures printed in the title: cross-validated when the file has them."""
    for key, what in (("refit_cross_validated", "cross-validated"), ("refit_in_sample", "in sample")):
        if key in summary:
            s = summary[key]
            break
    else:
        s, what = summary, "as measured"
    return (f"{what}: median error {s['median_abs_error']:.1%}, within 5% of best {s['share_within_5pct']:.1%}, "
            f"worst {s['worst_vs_dense']:.3f}")


def main(src: str, dst: str) -> None:
    """Scatter of predicted vs measured speedup, one colour per form, log-log, with the y = x line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(src) as fh:
        data = json.load(fh)
    rows = [r for r in data["rows"] if r.get("dense_ms") and "predicted" in r]
    for r in rows:
        r.setdefault("measured", r["dense_ms"] / r["sparse_ms"])
        # held-out predictions when the file has them: the plot should not flatter the fit
        r["predicted"] = r.get("predicted_cv", r["predicted"])
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for series in sorted({_series(r) for r in rows}):
        pts = [r for r in rows if _series(r) == series]
        ax.scatter([r["measured"] for r in pts], [r["predicted"] for r in pts], label=series, s=16)
    lo = min(min(r["measured"], r["predicted"]) for r in rows) * 0.8
    hi = max(max(r["measured"], r["predicted"]) for r in rows) * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = measured")
    ax.axhline(1.05, color="grey", lw=0.5)   # the decision margin
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured speedup over dense")
    ax.set_ylabel("predicted speedup over dense")
    ax.set_title(f"sparsecc cost model, {data['device']}\n{_title_metrics(data['summary'])}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
