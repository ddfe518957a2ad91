"""The decision-aware refit (sparsecc.cost.fit) and bench/costmodel.py's CPU path (row loading, sites)."""

import json
import math
import os
import sys

import pytest

from sparsecc.cost.fit import FitRow, Hardware, cross_validate, fit, loss, metrics, predict_rows, predict_times

HW = Hardware(peak=700e12, bandwidth=3e12, launch_overhead_s=4e-6, sm_count=132)
TRUE = {"dense": dict(compute_small=0.3, compute_large=0.9, memory=0.8, floor_s=0.0, tile_overhead=0.0),
        "sparse": dict(compute_small=0.2, compute_large=0.5, memory=0.6, floor_s=6e-5, tile_overhead=2.0)}
BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


def _kernel(family, flops, nbytes, steps=None):
    return dict(family=family, flops=flops, nbytes=nbytes, launches=1, steps=steps, programs=None)


def _rows(families, scale_noise=()):
    """Rows whose measured times come from ``families`` itself (optionally scaled per row)."""
    rows = []
    for i, (m, density) in enumerate((m, d) for m in (16, 256, 2048, 8192) for d in (0.1, 0.3, 0.6, 0.9)):
        flops, nbytes = 2.0 * m * 4096 * 14336, 2.0 * (4096 * 14336 + m * (4096 + 14336))
        dense = [_kernel("dense", flops, nbytes)]
        sparse = [_kernel("sparse", flops * density, nbytes * density, steps=density * 64)]
        row = FitRow(f"m={m} d={density}", f"m={m}", "synthetic", dense, sparse, 1.0, 1.0)
        row.dense_s = predict_rows([FitRow("", "", "", [], dense, None, 1.0)], families, HW)[0]
        row.sparse_s = predict_rows([FitRow("", "", "", [], sparse, None, 1.0)], families, HW)[0]
        if i < len(scale_noise):
            row.sparse_s *= scale_noise[i]
        rows.append(row)
    return rows


def test_metrics_on_a_hand_example():
    rows = [FitRow("a", "g", "s", [], [], 2.0, 1.0), FitRow("b", "g", "s", [], [], 1.0, 2.0)]
    # a: measured 2x, predicted 1.0 -> kept dense: chosen 2.0 vs best 1.0; b: predicted 1.1 -> sparse, 2x slower
    m = metrics(rows, [1.0, 1.1])
    assert m["points"] == 2
    assert m["median_abs_error"] == pytest.approx((0.5 + 1.2) / 2)
    assert m["share_within_5pct"] == 0
    assert m["worst_vs_dense"] == pytest.approx(2.0)
    assert m["mean_regret"] == pytest.approx(1.0)
    assert metrics(rows, [2.0, 0.5])["share_within_5pct"] == 1


def test_refit_recovers_a_table_that_decides_like_the_truth():
    rows = _rows(TRUE)
    start = {"dense": dict(TRUE["dense"]),
             "sparse": dict(compute_small=0.4, compute_large=0.9, memory=0.9, floor_s=0.0, tile_overhead=0.0)}
    before = metrics(rows, predict_rows(rows, start, HW))
    fitted = fit(rows, start, HW)
    after = metrics(rows, predict_rows(rows, fitted, HW))
    assert loss(rows, predict_times(rows, fitted, HW)) < loss(rows, predict_times(rows, start, HW))
    assert before["mean_regret"] > 0
    assert after["mean_regret"] == pytest.approx(0, abs=0.01)
    assert after["worst_vs_dense"] <= 1.02
    assert after["median_abs_error"] < 0.05
    for name in ("compute_small", "compute_large", "memory"):
        assert 0 < fitted["sparse"][name] <= 1


def test_regret_outweighs_a_small_error():
    # one measured point much slower than the formulas can express: the fit gives up accuracy elsewhere
    # rather than choose a variant that loses to dense
    rows = _rows(TRUE, scale_noise=(1.0,) * 5 + (3.0,))
    fitted = fit(rows, TRUE, HW)
    assert metrics(rows, predict_rows(rows, fitted, HW))["worst_vs_dense"] <= \
        metrics(rows, predict_rows(rows, TRUE, HW))["worst_vs_dense"]


def test_cross_validation_predicts_every_row_from_other_shapes():
    rows = _rows(TRUE)
    held_out = cross_validate(rows, TRUE, HW, folds=4, max_sweeps=2)
    assert len(held_out) == len(rows) and all(math.isfinite(p) for p in held_out)
    # the true table is a fixed point: held-out predictions equal the in-sample ones
    assert held_out == pytest.approx(predict_rows(rows, TRUE, HW), rel=0.05)


@pytest.fixture(scope="module")
def bench_costmodel():
    sys.path.insert(0, BENCH)
    try:
        import costmodel
        yield costmodel
    finally:
        sys.path.remove(BENCH)


def test_bench_grid_sites_have_kernels_without_a_gpu(bench_costmodel):
    for quick in (True, False):
        points = bench_costmodel.attention_points(quick) + bench_costmodel.linear_points(quick)
        seqs = {site["seq"] for _, site in points if site["kind"] == "attention"}
        tokens = {site["tokens"] for _, site in points if site["kind"] in ("linear", "ffn")}
        assert 131072 in seqs and min(seqs) == 1024
        assert {1, 8192} <= tokens
        names = {(site.get("form") or {}).get("name", site.get("mode")) for _, site in points}
        assert {"streaming", "block_sparse", "block_weights", "2:4", None, "gate"} <= names
        for label, site in points:
            dense, sparse = bench_costmodel.site_kernels(site)
            assert dense and sparse, label
            assert all(k["flops"] > 0 and k["nbytes"] > 0 for k in dense + sparse), label
        densities = {site["form"]["density"] for _, site in points
                     if (site.get("form") or {}).get("name") == "block_weights"}
        assert min(densities) == 0.05 and max(densities) == 0.9
        decode = [site for _, site in points if site.get("seq_q") == 1]
        assert {site["batch"] for site in decode} >= {1, 8} and max(site["seq"] for site in decode) == 131072
        # on the GPU the run records which kernels ran; the decode kernel's rows cost its kept K/V
        longest = max(decode, key=lambda site: site["seq"])
        dense, sparse = bench_costmodel.site_kernels(dict(longest, program="decode"))
        assert [k["family"] for k in dense + sparse] == ["attention_dense_decode", "attention_decode"]
        assert sparse[0]["nbytes"] < dense[0]["nbytes"] / 20     # 4351 of 131072 keys, and q / o


def test_bench_loads_every_measured_source(bench_costmodel):
    sources = {"costmodel_h100_full.json": 87, "costmodel_h100_quick.json": 25, "crossover_h100.json": 30}
    for name, count in sources.items():
        rows = bench_costmodel.load_rows(os.path.join(BENCH, name))
        assert len(rows) == count, name
        for r in rows:
            fit_row = bench_costmodel.to_fit_row(r, name)
            assert fit_row.dense and fit_row.sparse and fit_row.sparse_s > 0
    crossover = bench_costmodel.load_rows(os.path.join(BENCH, "crossover_h100.json"))
    assert {r["site"]["kind"] for r in crossover} == {"linear", "ffn"}
    assert any(r["timing"] == "graph" for r in crossover)
    text = ("| stream 8K | 0.935 | 0.982 | 1.084 |\n| random 16K | 0.731 | 3.776 | 0.738 |\n"
            "| stream 32K hkv32 d64 | 2.711 | 9.389 | nan |\n| vertical_slash 32K hkv8 | 21.779 | 14.575 | nan |\n"
            "- block_topk 32K hkv8: estimate + table build 0.385 ms = 2.6% of dense SDPA (limit 10%)\n")
    rows = bench_costmodel.rows_from_results_md(text)
    assert [r["label"] for r in rows] == ["stream 8K hkv32", "random 16K hkv32", "stream 32K hkv32",
                                          "block_topk estimate 32K"]
    assert rows[1]["site"]["form"]["random_blocks"] == 7 and rows[2]["site"]["head_dim"] == 64
    assert rows[3]["dense_ms"] is None and bench_costmodel.to_fit_row(rows[3], "md").dense_s is None


def test_form_specs_round_trip(bench_costmodel):
    from sparsecc.forms import BlockSparse, BlockTopK, BlockWeights, Streaming, TwoFour
    for form in (Streaming(64, 256), BlockSparse(128, 4, 1, 2), BlockTopK(block=128, topk=12),
                 BlockWeights((64, 64), 0.05), TwoFour()):
        spec = bench_costmodel.form_spec(form)
        assert bench_costmodel.make_form(json.loads(json.dumps(spec))) == form
    with pytest.raises(ValueError, match="unknown form"):
        bench_costmodel.make_form({"name": "nope"})


def test_bench_report_runs_offline(bench_costmodel, capsys):
    # the --refit-from path end to end on the 2:4 and gate-mode rows, without writing the table
    from sparsecc.cost.hardware import H100_SXM
    rows = [r for r in bench_costmodel.load_rows(os.path.join(BENCH, "crossover_h100.json"))
            if r["site"]["kind"] == "ffn" or r["site"].get("form") == {"name": "2:4"}]
    summary = bench_costmodel.report(rows, H100_SXM, "test device", write=False, folds=2, sweeps=1)
    assert set(summary) == {"shipped", "refit_in_sample", "refit_cross_validated"}
    assert all(s["points"] == len(rows) for s in summary.values())
    assert all("predicted" in r and "predicted_cv" in r for r in rows)
    assert "cross-validated (2 folds over shapes)" in capsys.readouterr().out


def test_fitted_sparse_floors_never_undercut_dense(bench_costmodel):
    """On measured H100 rows, no sparse family's fitted host floor falls below its dense counterpart's."""
    from sparsecc.cost.efficiency import table
    from sparsecc.cost.fit import dense_family_of, prior

    path = os.path.join(BENCH, "costmodel_h100_quick_v4.json")
    rows = [bench_costmodel.to_fit_row(r, "v4") for r in bench_costmodel.load_rows(path)]
    fitted = fit(rows, prior(table()["families"]), HW)
    for fam, entry in fitted.items():
        dense = dense_family_of(fam)
        if fam != dense:
            assert entry["floor_s"] >= fitted[dense]["floor_s"], fam


def test_a_partial_refit_moves_only_the_named_parameters():
    rows = _rows(TRUE)
    start = {"dense": dict(TRUE["dense"], fixed_s=0.0),
             "sparse": dict(compute_small=0.2, compute_large=0.9, memory=0.6, floor_s=6e-5, tile_overhead=2.0,
                            fixed_s=0.0)}
    fitted = fit(rows, start, HW, free={"sparse": ("compute_large",)})
    assert fitted["dense"] == start["dense"]
    assert {k: v for k, v in fitted["sparse"].items() if k != "compute_large"} == \
        {k: v for k, v in start["sparse"].items() if k != "compute_large"}
    assert fitted["sparse"]["compute_large"] == pytest.approx(TRUE["sparse"]["compute_large"], rel=0.1)
    held_out = cross_validate(rows, start, HW, folds=4, max_sweeps=2, free={"sparse": ("compute_large",)})
    assert all(math.isfinite(p) for p in held_out)


def test_bench_partial_refit_runs_offline(bench_costmodel, capsys):
    """``--partial`` on the stored sm_90 rows: the new families start as the named shipped ones, only they are
    fitted, and the figures (start, in-sample, cross-validated) are printed; nothing is written without --write."""
    from sparsecc.cost.efficiency import TABLE_PATH
    from sparsecc.cost.hardware import H100_SXM

    before = open(TABLE_PATH, encoding="utf-8").read()
    rows = bench_costmodel.load_rows(os.path.join(BENCH, "costmodel_h100_sm90.json"))
    assert len(rows) == 7 and {r["site"]["program"] for r in rows} == {"sm90"}
    partial = {"attention_sparse_sm90": "attention_sparse", "attention_table_sm90": "attention_random"}
    summary = bench_costmodel.partial_report(rows, H100_SXM, "test device", partial, ["compute_large"],
                                             write=False, folds=3, sweeps=2)
    assert set(summary) == {"start", "refit_in_sample", "refit_cross_validated"}
    assert summary["refit_in_sample"]["median_abs_error"] < summary["start"]["median_abs_error"]
    assert all("predicted_cv" in r for r in rows)
    assert "sm90 streaming 128+4096 32K" in capsys.readouterr().out
    assert open(TABLE_PATH, encoding="utf-8").read() == before
    with pytest.raises(SystemExit, match="no family 'nope'"):
        bench_costmodel.partial_report(rows, H100_SXM, "d", {"x": "nope"}, ["compute_large"], False, 1, 1)
    with pytest.raises(SystemExit, match="not a table parameter"):
        bench_costmodel.partial_report(rows, H100_SXM, "d", partial, ["speed"], False, 1, 1)
    with pytest.raises(SystemExit, match="no row runs"):
        bench_costmodel.partial_report(rows, H100_SXM, "d", {"x": "attention_sparse"}, ["compute_large"], False, 1, 1)


def test_dense_counterparts_and_named_only_parameters():
    from sparsecc.cost.fit import NAMED_ONLY, _free_params, dense_family_of

    assert dense_family_of("attention_decode") == dense_family_of("attention_dense_decode") == "attention_dense_decode"
    assert dense_family_of("attention_sparse_sm90") == "attention_dense"
    assert dense_family_of("gemm_block_sparse_decode") == "gemm_dense"
    rows = _rows(TRUE)
    every = _free_params(rows, TRUE)
    assert every and not any(name in NAMED_ONLY for _, name in every)    # a full refit leaves fixed_s alone
    assert ("sparse", "fixed_s") in _free_params(rows, TRUE, free={"sparse": ("fixed_s",)})


def test_a_full_refit_keeps_the_record_of_partial_refits_it_did_not_redo(bench_costmodel, tmp_path, monkeypatch):
    """``report(write=True)`` on rows of 2:4 and the gate-mode FFN keeps the shipped partial refits' record (their
    families were not fitted: no row runs them) and their values."""
    from sparsecc.cost.efficiency import table
    from sparsecc.cost.hardware import H100_SXM

    out = tmp_path / "efficiency.json"
    monkeypatch.setattr(bench_costmodel, "TABLE_PATH", str(out))
    rows = [r for r in bench_costmodel.load_rows(os.path.join(BENCH, "crossover_h100.json"))
            if r["site"]["kind"] == "ffn"]
    bench_costmodel.report(rows, H100_SXM, "test device", write=True, folds=1, sweeps=1)
    written = json.loads(out.read_text())
    shipped = table()
    assert written["provenance"]["partial_refits"] == shipped["provenance"]["partial_refits"]
    for fam in ("attention_decode", "attention_dense_decode", "attention_sparse_sm90", "attention_table_sm90"):
        assert written["families"][fam] == shipped["families"][fam], fam
    assert written["families"]["ffn_gate"] != shipped["families"]["ffn_gate"]      # fitted from the generic start
