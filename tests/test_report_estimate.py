"""One estimate type: the cost model's ``Estimate`` is what the decision carries and what the report embeds."""

import json
import typing

import pytest
import torch

import sparsecc
from sparsecc.cost import Crossover, Estimate
from sparsecc.passes import site as passes_site
from sparsecc.report import Report, SiteRecord
from tests import zoo

# The per-site figures a report's JSON has always carried (flat, times in microseconds).
FLAT_KEYS = ("density", "dense_flops", "sparse_flops", "dense_bytes", "sparse_bytes", "dense_time_us",
             "sparse_time_us", "crossover", "predicted_speedup")


def test_passes_use_the_cost_models_estimate_type():
    assert passes_site.Estimate is Estimate
    assert typing.get_type_hints(passes_site.Decision)["estimate"] == typing.Optional[Estimate]


def test_a_record_reads_its_figures_from_the_embedded_estimate():
    est = Estimate(dense_flops=8e9, sparse_flops=2e9, dense_bytes=4e6, sparse_bytes=3e6, dense_time_s=2e-3,
                   sparse_time_s=5e-4, crossover=Crossover("seq_k", 3712))
    record = SiteRecord("attention", "layers.0.attn", "streaming", True, "applied", estimate=est)
    assert record.estimate is est
    assert record.density == pytest.approx(0.25)
    assert record.dense_time_us == pytest.approx(2000.0) and record.sparse_time_us == pytest.approx(500.0)
    assert record.predicted_speedup == pytest.approx(4.0)
    assert record.crossover == "sparse when seq_k >= 3712" and record.crossover_at == 3712
    data = json.loads(Report(sites=[record]).to_json())["sites"][0]
    assert {k: data[k] for k in FLAT_KEYS} == pytest.approx(
        {"density": 0.25, "dense_flops": 8e9, "sparse_flops": 2e9, "dense_bytes": 4e6, "sparse_bytes": 3e6,
         "dense_time_us": 2000.0, "sparse_time_us": 500.0, "crossover": "sparse when seq_k >= 3712",
         "predicted_speedup": 4.0})
    assert data["crossover_at"] == 3712 and data["worst_tokens"] is None and "estimate" not in data


def test_a_record_without_an_estimate_has_no_figures():
    record = SiteRecord("linear", "fc", None, False, "no rule")
    assert all(getattr(record, k) is None for k in FLAT_KEYS)
    data = record.to_dict()
    assert all(data[k] is None for k in FLAT_KEYS)
    assert "-" in str(Report(sites=[record]))


def test_figures_read_the_embedded_estimate_and_cannot_be_assigned():
    """One source: the record's figures are the estimate's, in the report's units; no copy can drift."""
    est = Estimate(3.0, 1.0, 5.0, 4.0, 1e-4, 4e-5, crossover=Crossover("seq_k", None))
    record = SiteRecord("attention", "a", "streaming", False, "kept dense", estimate=est)
    assert (record.dense_flops, record.sparse_flops, record.dense_bytes, record.sparse_bytes) == (3.0, 1.0, 5.0, 4.0)
    assert record.dense_time_us == pytest.approx(100.0) and record.sparse_time_us == pytest.approx(40.0)
    assert record.density == pytest.approx(1 / 3) and record.crossover == "dense for every seq_k"
    with pytest.raises(AttributeError, match="estimate"):
        record.dense_time_us = 1.0
    assert record.dense_time_us == pytest.approx(100.0)


def test_the_report_shows_the_estimate_the_decision_made():
    torch.manual_seed(0)
    model = zoo.SdpaAttention().eval()
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "streaming", "sink": 4, "window": 8}],
            "linear": [{"modules": "*o_proj", "form": "2:4"}]}
    report = sparsecc.explain(model, torch.randn(1, 300, 32), spec=spec)
    estimated = [s for s in report.sites if s.estimate is not None]
    assert {s.kind for s in estimated} == {"attention", "linear"}
    data = json.loads(report.to_json())
    for record, row in zip(report.sites, data["sites"]):
        if record.estimate is None:
            continue
        assert isinstance(record.estimate, Estimate)
        assert row["dense_time_us"] == pytest.approx(record.estimate.dense_time_s * 1e6, rel=1e-12)
        assert row["sparse_flops"] == record.estimate.sparse_flops
        assert row["predicted_speedup"] == pytest.approx(record.estimate.speedup, rel=1e-12)
        assert f"{record.estimate.speedup:.2f}x" in str(report)


def test_a_forced_site_reports_the_crossover_as_an_estimate_only(eager_lowering):
    """policy force applies the form at every length: a symbolic sequence's crossover is the cost model's view,
    never a runtime switch, and the reason says so (it read "sparse when seq_k >= N" as if the op branched)."""
    import sparsecc
    from tests import zoo

    spec = {"version": 1, "attention": [{"form": "streaming", "sink": 1, "window": 4, "policy": "force"}]}
    with torch.no_grad():
        compiled = sparsecc.compile(zoo.SdpaAttention().eval(), spec=spec, kernels="reference", dynamic=True)
        compiled(torch.randn(1, 12, 32))
    (site,) = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert site.applied and "the cost model would run it sparse when seq_k >= " in site.reason
    assert "dense_below" not in str(site.attrs)
