"""Validate (and refit) the cost model against measured kernel times.

    python bench/costmodel.py [--quick] [--json rows.json] [--write]          # GPU: measure the grid
    python bench/costmodel.py --refit-from bench/costmodel_h100_full.json \\
        [--also bench/costmodel_h100_quick.json bench/crossover_h100.json bench/RESULTS.md] [--write]
    python bench/costmodel.py --refit-from bench/costmodel_h100_sm90.json --folds 7 \\
        --partial attention_sparse_sm90=attention_sparse,attention_table_sm90=attention_random [--write]

On the GPU it measures a grid of sites, each checked against its reference
on random data before it is timed: attention prefill (B=1, H=32, Hkv=8,
D=128, causal, bf16) at 1K..128K x streaming windows / block layouts /
block_topk; decode steps (one query row, sink 128 + window 4096, B = 1, 8,
32 over caches of 8K..128K); block-sparse weights at M = 1..8192 x density 5..90%; 2:4 via
cuSPARSELt at M = 1..8192; activation-sparse GEMVs (M = 1..16, sparsity
50..95%); the gate-mode (CATS) FFN at M = 1..16. Dense anchors (SDPA, cuBLAS)
and the sparse ops (``torch.ops.sparsecc.*``, kernels="triton") are timed
with ``triton.testing.do_bench`` medians (the least of three alternating rounds
per side), i.e. eager calls with their host cost, which is what ``auto``
decides for. Rows are saved after every point (``--json``), so a run cut
short keeps what it measured.

It prints the median absolute error of the predicted speedup (target <=
20%), the share of points where the chosen variant is within 5% of the best
measured one (target >= 95%), and the worst chosen/dense time (target <=
1.02), for the shipped table and, after a refit (``sparsecc.cost.fit``), in
sample and cross-validated (grouped 8-fold: all forms and densities of one
shape are held out together).

``--refit-from`` needs no GPU: it reads saved rows (this script's own
``--json`` output, the older ``bench/costmodel_*.json`` rows, the
``bench/crossover_*.json`` grid of ``bench/ffn.py`` and the attention table of
``bench/RESULTS.md``), refits, and with ``--write`` writes
``sparsecc/cost/efficiency.json`` with its provenance. ``--partial`` fits
new families alone (each starting from a shipped family, the rest of the
table fixed): the sm_90 Gluon programs' families come from the stored H100
rows of ``bench/costmodel_h100_sm90.json`` that way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from typing import Callable, List, Optional

import torch

from sparsecc.cost.efficiency import TABLE_PATH, table
from sparsecc.cost.fit import PARAMS, FitRow, Hardware, cross_validate, fit, metrics, predict_rows, prior
from sparsecc.cost.formulas import ELEM, B, D, H, HKV, K, M, N, SK, SQ
from sparsecc.cost.hardware import H100_SXM, PROFILES, profile_for
from sparsecc.cost.sites import attention_costs, ffn_costs, linear_costs
from sparsecc.forms import BlockSparse, BlockTopK, BlockWeights, Streaming, TwoFour

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402 - bench/ is on the path
from costmodel_rows import (ATTN, DTYPE, LINEAR_SHAPES, LLAMA_D, LLAMA_F,  # noqa: E402,F401
                            form_spec, load_rows, make_form, rows_from_costmodel_json, rows_from_crossover_json,
                            rows_from_results_md)


# ------------------------------------------------------------------ sites as the cost formulas' kernels

def site_kernels(site: dict):
    """(dense kernels, sparse kernels) of a site as plain numbers, from the package's cost formulas."""
    elem = {ELEM: torch.tensor([], dtype=DTYPE).element_size()}
    kind = site["kind"]
    if kind in ("attention", "estimate"):
        form = make_form(site["form"])
        dense, sparse = attention_costs(form, None, True, site.get("program", "triton"))
        values = {B: site["batch"], H: site["heads"], HKV: site["kv_heads"], SQ: site.get("seq_q", site["seq"]),
                  SK: site["seq"], D: site["head_dim"], **elem}
        sparse_kernels = sparse.kernels(values)
        if kind == "estimate":   # the estimate pass alone
            return [], [k for k in sparse_kernels if k["family"] == "attention_estimate"]
        return dense.kernels(values), sparse_kernels
    if kind == "linear":
        dense, sparse = linear_costs(make_form(site["form"]), site.get("activation_sparsity"), site["tokens"])
        values = {N: site["out"], K: site["in"], **elem}
        return dense.kernels(values), sparse.kernels(values)
    if kind == "ffn":
        d, f = site["d_model"], site["d_ff"]
        linears = [(d, f), (d, f), (f, d)] if site["gated"] else [(d, f), (f, d)]
        dense, sparse = ffn_costs(linears, site["sparsity"], site["mode"])
        values = {M: site["tokens"], **elem}
        return dense.kernels(values), sparse.kernels(values)
    raise ValueError(f"unknown site kind {kind!r}; expected attention, estimate, linear or ffn")


def site_group(site: dict) -> str:
    """The shape a point belongs to (cross-validation holds out whole shapes)."""
    if site["kind"] in ("attention", "estimate"):
        program = "" if site.get("program", "triton") == "triton" else f" {site['program']}"
        rows = f" Sq={site['seq_q']}" if "seq_q" in site else ""
        return f"attention S={site['seq']}{rows} B={site['batch']} hkv={site['kv_heads']} d={site['head_dim']}{program}"
    if site["kind"] == "linear":
        return f"linear M={site['tokens']} {site['in']}->{site['out']}"
    return f"ffn M={site['tokens']}"


def to_fit_row(row: dict, source: str) -> FitRow:
    """A measured row (dict with site, dense_ms / sparse_ms, timing) as a ``FitRow``."""
    dense, sparse = site_kernels(row["site"])
    dense_ms = row.get("dense_ms")
    return FitRow(row["label"], site_group(row["site"]), source, dense, sparse,
                  None if dense_ms is None else dense_ms / 1e3, row["sparse_ms"] / 1e3,
                  host=row.get("timing", "do_bench") != "graph")


# ------------------------------------------------------------------ the GPU grid

def attention_points(quick: bool):
    """(label, site) grid; 128K only for streaming (dense SDPA alone takes ~0.25 s per call there)."""
    seqs = [1024, 4096, 16384, 65536] if quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    forms = [Streaming(128, 1024), Streaming(128, 4096), BlockSparse(128, 2, 1, 0), BlockSparse(128, 4, 1, 2)]
    forms += [] if quick else [Streaming(64, 256), BlockTopK(block=128, topk=12)]
    pts = [(s, f) for s in seqs for f in forms if not (isinstance(f, BlockTopK) and s < 8192)]
    pts += [(131072, Streaming(128, 4096))] + ([] if quick else [(131072, Streaming(128, 1024))])
    out = [(f"attn {f} S={s}", dict(kind="attention", form=form_spec(f), seq=s, **ATTN)) for s, f in pts]
    # Decode steps: one query row over a cache (the split-KV decode kernel against SDPA), called plainly
    form = Streaming(128, 4096)
    for b in (1, 8) if quick else (1, 8, 32):
        for kv in (32768, 131072) if quick else (8192, 32768, 131072):
            out.append((f"decode {form} B={b} KV={kv}", dict(kind="attention", form=form_spec(form), seq=kv, seq_q=1,
                                                              **{**ATTN, "batch": b})))
    return out


def linear_points(quick: bool):
    """(label, site) grid: block weights, 2:4, activation-sparse GEMVs, gate-mode FFN."""
    pts = []
    tokens = [1, 16, 128, 1024, 8192] if quick else [1, 4, 16, 128, 1024, 4096, 8192]
    densities = (0.05, 0.25, 0.5, 0.9) if quick else (0.05, 0.1, 0.25, 0.5, 0.75, 0.9)
    for m in tokens:
        for k, n in LINEAR_SHAPES:
            for d in densities:
                pts.append((f"bsr d={d} M={m} {k}->{n}",
                            dict(kind="linear", form=form_spec(BlockWeights((64, 64), d)), tokens=m, **{"in": k,
                                                                                                        "out": n})))
            pts.append((f"2:4 M={m} {k}->{n}", dict(kind="linear", form=form_spec(TwoFour()), tokens=m,
                                                    **{"in": k, "out": n})))
    for m in (1, 4, 16) if quick else (1, 2, 4, 16):
        for s in (0.5, 0.9) if quick else (0.5, 0.7, 0.9, 0.95):
            for k, n in LINEAR_SHAPES[:1] if quick else LINEAR_SHAPES:
                pts.append((f"act s={s} M={m} {k}->{n}", dict(kind="linear", form=None, activation_sparsity=s,
                                                              tokens=m, **{"in": k, "out": n})))
            pts.append((f"gate ffn s={s} M={m}", dict(kind="ffn", mode="gate", d_model=LLAMA_D, d_ff=LLAMA_F,
                                                      gated=True, tokens=m, sparsity=s)))
    return pts


# Timing rounds per side. Calls of tens of microseconds are host-bound, and one do_bench median of them moved by
# up to 2x between neighbouring points of one run (a host hiccup); the least of three alternating medians keeps one
# hiccup from deciding a row.
ROUNDS = 3


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` by CUDA events (after a warm-up)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=50, return_mode="median")


def _check(out, ref, what: str) -> None:
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    if not err < 2e-2:
        raise AssertionError(f"{what}: the Triton path disagrees with its reference (rel err {err:.3g})")


def _program(form, q, k, scale) -> str:
    """Which kernels the op's wrapper runs for this causal, unmasked call (q/k/v alike), by the wrapper's own rules:
    "decode" (the split-KV decode kernel), "sm90" (the Gluon program for Hopper) or "triton"."""
    from sparsecc.codegen.hopper_prefill import hopper_table_runs
    from sparsecc.codegen.streaming_rules import streaming_runs_decode_kernel, streaming_runs_hopper_program

    h, sq, d, hkv, sk = q.shape[1], q.shape[2], q.shape[3], k.shape[1], k.shape[2]
    facts = (q.device, (q.dtype,) * 3, (d,) * 3, sq, sk)
    rule = dict(causal=True, masked=False, return_lse=False)
    if isinstance(form, Streaming) and streaming_runs_decode_kernel(
            *facts, scale=scale, sinks=[form.sink] * h, windows=[form.window] * h, kv_heads=hkv, **rule):
        return "decode"
    if isinstance(form, Streaming):
        runs = streaming_runs_hopper_program(*facts, scale=scale, sinks=[form.sink] * h, windows=[form.window] * h,
                                             **rule)
    else:
        runs = isinstance(form, BlockSparse) and hopper_table_runs(*facts, block=form.block, **rule)
    return "sm90" if runs else "triton"


def _attention_calls(site):
    import torch.nn.functional as F
    from sparsecc.codegen import ops
    b, h, hkv, s, d = site["batch"], site["heads"], site["kv_heads"], site["seq"], site["head_dim"]
    sq = site.get("seq_q", s)   # fewer query rows than keys: a decode step at the end of the cache
    q = torch.randn(b, h, sq, d, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(b, hkv, s, d, device="cuda", dtype=DTYPE) for _ in range(2))
    form, scale = make_form(site["form"]), d ** -0.5
    site["program"] = _program(form, q, k, scale)   # the row says which kernels ran (the cost model's family)
    if isinstance(form, Streaming):
        call = lambda impl: ops.op("streaming_attention")(q, k, v, None, scale, True, [form.sink] * h,  # noqa: E731
                                                           [form.window] * h, 0, impl)
    elif isinstance(form, BlockSparse):
        call = lambda impl: ops.op("block_sparse_attention")(q, k, v, None, scale, True, form.block,  # noqa: E731
                                                              form.local_blocks, form.global_blocks,
                                                              form.random_blocks, form.seed, [], 0, impl)
    else:
        from sparsecc.codegen.dynamic_attention import op_args as dynamic_op_args
        call = lambda impl: ops.op("dynamic_block_attention")(q, k, v, None, scale, True,  # noqa: E731
                                                               *dynamic_op_args(form), 0, impl)
    # SDPA's is_causal aligns the queries top-left: rows at the end of the cache see every key, so no mask there
    dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=sq == s, enable_gqa=True)  # noqa: E731
    # the reference is too slow and large past 8K keys of prefill, or past 1M cached keys of decode (fp32 copies)
    return dense, call, s <= 8192 or (sq <= 16 and b * s <= 8 * 131072)


def _linear_calls(site):
    import torch.nn.functional as F
    from sparsecc.codegen import ops
    from sparsecc.weights import compress_2to4, compress_block_weights
    m, k, n = site["tokens"], site["in"], site["out"]
    w = torch.randn(n, k, device="cuda", dtype=DTYPE) / math.sqrt(k)
    x = torch.randn(m, k, device="cuda", dtype=DTYPE)
    form = make_form(site["form"])
    if isinstance(form, BlockWeights):
        c = compress_block_weights(w, form)
        call = lambda impl: ops.op("block_sparse_linear")(x, c.blocks, c.row_ptr, c.col_idx, None, n, k, impl)  # noqa
    elif isinstance(form, TwoFour):
        c = compress_2to4(w)
        call = lambda impl: ops.op("semi_structured_linear")(x, c.values, c.indices, None, n, k, impl)  # noqa
    else:
        # tau at the |x| quantile gives the requested activation sparsity on this data
        s = site["activation_sparsity"]
        tau = float(x.float().abs().flatten().kthvalue(max(1, int(s * x.numel()))).values)
        call = lambda impl: ops.op("threshold_linear")(x, w, None, tau, impl)  # noqa: E731
    return (lambda: F.linear(x, w)), call, True


def _ffn_calls(site):
    import torch.nn.functional as F
    from sparsecc.codegen import ops
    m, d, f = site["tokens"], site["d_model"], site["d_ff"]
    wg, wu = (torch.randn(f, d, device="cuda", dtype=DTYPE) / math.sqrt(d) for _ in range(2))
    wd = torch.randn(d, f, device="cuda", dtype=DTYPE) / math.sqrt(f)
    x = torch.randn(m, d, device="cuda", dtype=DTYPE)
    # tau at the quantile of |silu(gate)| that drops the requested share of neurons on this data
    act = F.silu(F.linear(x, wg)).float().abs().flatten()
    tau = float(act.kthvalue(max(1, int(site["sparsity"] * act.numel()))).values)
    dense = lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)  # noqa: E731
    call = lambda impl: ops.op("gate_sparse_ffn")(x, wg, None, wu, None, wd, None, "silu", tau, impl)  # noqa: E731
    return dense, call, True


def measure(label: str, site: dict) -> dict:
    """Check the sparse op against its reference, then time dense and sparse; return the row."""
    makers = {"attention": _attention_calls, "linear": _linear_calls, "ffn": _ffn_calls}
    dense, call, check = makers[site["kind"]](site)
    if check:
        _check(call("triton"), call("reference"), label)
    sparse = lambda: call("triton")  # noqa: E731
    dense_ms, sparse_ms = [], []
    for _ in range(ROUNDS):   # alternate the sides; the least median drops host-jitter outliers of small calls
        dense_ms.append(_bench(dense))
        sparse_ms.append(_bench(sparse))
    row = dict(label=label, site=site, dense_ms=min(dense_ms), sparse_ms=min(sparse_ms), timing="do_bench",
               rounds=dict(dense=dense_ms, sparse=sparse_ms))
    torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------ report and refit

def hardware(hw_profile) -> Hardware:
    """The refit's numbers of a profile (bf16)."""
    return Hardware(hw_profile.peak(DTYPE), hw_profile.bandwidth, hw_profile.launch_overhead_s, hw_profile.sm_count)


def print_metrics(title: str, m: dict) -> None:
    """One block of the three figures."""
    if not m.get("points"):
        print(f"{title}: no speedup rows")
        return
    print(f"\n{title} ({m['points']} points)")
    print(f"  {'median |predicted - measured| / measured speedup':50s} {m['median_abs_error']:7.1%}   <= 20%")
    print(f"  {'chosen within 5% of best':50s} {m['share_within_5pct']:7.1%}   >= 95%")
    print(f"  {'worst chosen / dense time':50s} {m['worst_vs_dense']:7.3f}   <= 1.02")
    print(f"  {'mean regret (chosen / best - 1)':50s} {m['mean_regret']:7.2%}")


def report(rows: List[dict], hw_profile, device: str, write: bool, folds: int, sweeps: int) -> dict:
    """Metrics of the shipped table, then refit: in-sample and cross-validated; write the table if asked."""
    hw = hardware(hw_profile)
    fit_rows = [to_fit_row(r, r.get("source", "grid")) for r in rows]
    shipped = table()["families"]
    before = predict_rows(fit_rows, shipped, hw)
    summary = {"shipped": metrics(fit_rows, before)}
    print_metrics("shipped table", summary["shipped"])
    # Every fit (and every fold) starts from the same generic table; a family no row runs keeps its shipped values
    # (it is not fitted, and the generic start would overwrite what another refit measured).
    used = {k["family"] for r in fit_rows for k in r.dense + r.sparse}
    start = {fam: (entry if fam in used else dict(shipped[fam])) for fam, entry in prior(shipped).items()}
    fitted = fit(fit_rows, start, hw, sweeps)
    after = predict_rows(fit_rows, fitted, hw)
    summary["refit_in_sample"] = metrics(fit_rows, after)
    print_metrics("refit table, scored on the rows it was fitted on (in-sample)", summary["refit_in_sample"])
    if folds > 1:
        held_out = cross_validate(fit_rows, start, hw, folds, sweeps)
        summary["refit_cross_validated"] = metrics(fit_rows, held_out)
        print_metrics(f"refit, cross-validated ({folds} folds over shapes)", summary["refit_cross_validated"])
        for r, p in zip(rows, held_out):
            r["predicted_cv"] = p
    for r, p_before, p_after in zip(rows, before, after):
        r["predicted_shipped"], r["predicted"] = p_before, p_after
        if r.get("dense_ms"):
            r["measured"] = r["dense_ms"] / r["sparse_ms"]
    if write:
        commit = source_version()
        sources = sorted({r.get("source", "grid") for r in rows})
        out = dict(table())
        out["families"] = fitted
        # Partial refits of families these rows did not run stay on record (their values were kept, see `start`).
        kept = [p for p in table()["provenance"].get("partial_refits", []) if not set(p["families"]) & used]
        out["provenance"] = {
            "device": device, "date": datetime.date.today().isoformat(), "commit": commit or "unknown",
            "source": f"refit by bench/costmodel.py (sparsecc.cost.fit: decision-aware coordinate descent) from "
                      f"{len(rows)} measured rows: {', '.join(sources)}",
            "metrics": summary,
            "regenerate": "python bench/costmodel.py --json rows.json --write (GPU), or --refit-from rows.json "
                          "[--also ...] --write"}
        if kept:
            out["provenance"]["partial_refits"] = kept
        out["notes"] = NOTES
        with open(TABLE_PATH, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
            fh.write("\n")
        print(f"wrote {TABLE_PATH}")
    return summary


NOTES = ("t = max(max(FLOPs * (1 + tile_overhead / steps) / (peak * eff_compute(FLOPs) * occupancy), "
         "bytes / (bandwidth * memory * occupancy)) + fixed_s, floor_s) + launches * launch_overhead; "
         "eff_compute rises log-linearly from compute_small at 1e8 FLOPs to compute_large at 1e10; "
         "floor_s is the per-call host time (eager), fixed_s a fixed device time per call (0 where absent); "
         "see sparsecc/cost/efficiency.py")


def partial_report(rows: List[dict], hw_profile, device: str, partial: dict, params: List[str], write: bool,
                   folds: int, sweeps: int, start_values: Optional[dict] = None) -> dict:
    """Fit new families alone, the rest of the shipped table fixed: ``partial`` maps each new family to the shipped
    family it starts from (the same work at another rate: a second kernel for one layout), ``params`` names the
    parameters fitted, ``start_values`` ({(family, parameter): value}) overrides start values (e.g. a bandwidth
    share measured beside the rows: coordinate descent moves one value at a time, and two families that are
    both far from it can settle on a shared wrong scale). Prints the rows' figures with the start and the fit, in
    sample and cross-validated (whole shapes held out); with ``write``, adds the families to ``efficiency.json``
    and records the refit in its provenance (``partial_refits``)."""
    hw = hardware(hw_profile)
    shipped = table()["families"]
    for new, base in partial.items():
        if base not in shipped:
            raise SystemExit(f"--partial {new}={base}: no family {base!r} in {TABLE_PATH}; known: {sorted(shipped)}")
    bad = sorted(set(params) - set(PARAMS))
    if bad:
        raise SystemExit(f"--params {','.join(bad)}: not a table parameter; expected some of {list(PARAMS)}")
    fit_rows = [to_fit_row(r, r.get("source", "grid")) for r in rows]
    used = {k["family"] for r in fit_rows for k in r.dense + r.sparse}
    if not used & set(partial):
        raise SystemExit(f"no row runs {sorted(partial)}: nothing to fit (rows' families: {sorted(used)})")
    start = {**shipped, **{new: dict(shipped[base]) for new, base in partial.items()}}
    for (fam, name), value in (start_values or {}).items():
        if fam not in partial or name not in PARAMS:
            raise SystemExit(f"--start {fam}.{name}: expected a family of --partial ({sorted(partial)}) and a "
                             f"parameter of {list(PARAMS)}")
        start[fam][name] = value
    free = {new: tuple(params) for new in partial}
    summary = {"start": metrics(fit_rows, predict_rows(fit_rows, start, hw))}
    print_metrics("start (each new family as the family it starts from)", summary["start"])
    fitted = fit(fit_rows, start, hw, sweeps, free)
    after = predict_rows(fit_rows, fitted, hw)
    summary["refit_in_sample"] = metrics(fit_rows, after)
    print_metrics("partial refit, in-sample", summary["refit_in_sample"])
    held_out = cross_validate(fit_rows, start, hw, folds, sweeps, free) if folds > 1 else after
    if folds > 1:
        summary["refit_cross_validated"] = metrics(fit_rows, held_out)
        print_metrics(f"partial refit, cross-validated ({folds} folds over shapes)", summary["refit_cross_validated"])
    print(f"\n{'row':40s} {'measured':>9s} {'start':>7s} {'fit':>7s} {'held out':>9s}")
    for r, fr, p0, p1, p2 in zip(rows, fit_rows, predict_rows(fit_rows, start, hw), after, held_out):
        r["predicted_start"], r["predicted"], r["predicted_cv"] = p0, p1, p2
        print(f"{r['label']:40s} {fr.measured:9.2f} {p0:7.2f} {p1:7.2f} {p2:9.2f}")
    for new in partial:
        print(f"{new}: " + ", ".join(f"{k} {v:g}" for k, v in fitted[new].items()))
    if write:
        out = dict(table())
        out["families"] = {**shipped, **{new: fitted[new] for new in partial}}
        provenance = dict(out["provenance"])
        refits = [p for p in provenance.get("partial_refits", []) if not set(p["families"]) & set(partial)]
        refits.append({"families": sorted(partial), "start_from": partial,
                       "start_values": {f"{fam}.{name}": v for (fam, name), v in (start_values or {}).items()},
                       "params": list(params), "device": device, "profile": hw_profile.name,
                       "date": datetime.date.today().isoformat(), "commit": source_version() or "unknown",
                       "source": sorted({r.get("source", "grid") for r in rows}), "metrics": summary,
                       "regenerate": "python bench/costmodel.py --refit-from ROWS --partial NEW=FROM[,...] "
                                     "--params P[,...] --write"})
        provenance["partial_refits"] = refits
        out["provenance"], out["notes"] = provenance, NOTES
        with open(TABLE_PATH, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
            fh.write("\n")
        print(f"wrote {TABLE_PATH}")
    return summary


def _save(path: Optional[str], rows, device: str) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"device": device, "rows": rows}, fh, indent=1)


def main() -> None:
    """Measure the grid (GPU) or read saved rows, print the figures last, optionally refit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid (about 5 minutes on an H100)")
    parser.add_argument("--json", "--out", dest="json", default=None, help="save rows here after every point")
    parser.add_argument("--write", action="store_true", help="refit and write sparsecc/cost/efficiency.json")
    parser.add_argument("--only", default=None, metavar="PREFIX",
                        help="measure only the grid points whose label starts with PREFIX (e.g. '2:4', 'decode')")
    parser.add_argument("--refit-from", default=None, help="saved rows to refit from (no GPU needed)")
    parser.add_argument("--also", nargs="*", default=[], help="more measured rows: costmodel/crossover JSON, "
                        "bench/RESULTS.md")
    parser.add_argument("--folds", type=int, default=8, help="cross-validation folds (1: none)")
    parser.add_argument("--sweeps", type=int, default=12, help="coordinate-descent sweeps per fit")
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES),
                        help="with --refit-from: the hardware profile the rows were measured on (default: this "
                             "machine's GPU, else h100)")
    parser.add_argument("--partial", default=None, metavar="NEW=FROM[,NEW=FROM]",
                        help="fit only these new families, each starting from a shipped one, the rest fixed")
    parser.add_argument("--params", default="compute_large,tile_overhead",
                        help="with --partial: the parameters fitted (default compute_large,tile_overhead)")
    parser.add_argument("--start", default=None, metavar="FAMILY.PARAM=VALUE[,...]",
                        help="with --partial: start values of the new families (default: those of FROM)")
    args = parser.parse_args()
    partial = None
    if args.partial:
        try:
            partial = dict(pair.split("=") for pair in args.partial.split(","))
        except ValueError:
            parser.error(f"--partial {args.partial!r}: expected NEW=FROM[,NEW=FROM]")
        if not args.refit_from:
            parser.error("--partial refits saved rows: give --refit-from")
    if (args.start or args.params != parser.get_default("params")) and not partial:
        parser.error("--start and --params go with --partial")
    start_values = {}
    for item in (args.start.split(",") if args.start else []):
        try:
            key, value = item.split("=")
            fam, name = key.split(".")
            start_values[(fam, name)] = float(value)
        except ValueError:
            parser.error(f"--start {item!r}: expected FAMILY.PARAM=VALUE")
    rows: List[dict] = []
    for path in ([args.refit_from] if args.refit_from else []) + args.also:
        for r in load_rows(path):
            rows.append({**r, "source": os.path.basename(path)})
    if args.refit_from:
        with open(args.refit_from, encoding="utf-8") as fh:
            device = json.load(fh).get("device", "unknown")
        if args.profile:
            hw_profile = PROFILES[args.profile]
        else:
            hw_profile = profile_for(torch.device("cuda")) if torch.cuda.is_available() else H100_SXM
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/costmodel.py needs a CUDA device (or --refit-from saved rows)")
        device = torch.cuda.get_device_name()
        hw_profile = profile_for(torch.device("cuda"))
        torch.manual_seed(0)
        points = [(label, site) for label, site in attention_points(args.quick) + linear_points(args.quick)
                  if args.only is None or label.startswith(args.only)]
        if not points:
            parser.error(f"--only {args.only!r}: no grid point's label starts with it")
        for label, site in points:
            row = {**measure(label, site), "source": "grid"}
            rows.append(row)
            _save(args.json, rows, device)
            print(f"{label:60s} dense {row['dense_ms']:8.4f} ms  sparse {row['sparse_ms']:8.4f} ms  "
                  f"{row['dense_ms'] / row['sparse_ms']:6.2f}x", flush=True)
    if partial:
        summary = partial_report(rows, hw_profile, device, partial, args.params.split(","), args.write, args.folds,
                                 args.sweeps, start_values)
    else:
        summary = report(rows, hw_profile, device, args.write, args.folds, args.sweeps)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"device": device, "summary": summary, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
