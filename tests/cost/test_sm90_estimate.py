"""The cost model times the kernels that will run: the Gluon programs for sm_90 have their own efficiency families
(fitted on the H100 rows of bench/costmodel_h100_sm90.json), and check picks them where the kernel wrappers' own
rules take a site's facts (``passes.attention_check.sparse_program``)."""

from __future__ import annotations

import json
import os
import statistics

import pytest
import torch

from sparsecc.codegen import hopper_prefill
from sparsecc.cost.formulas import attention_family
from sparsecc.cost.hardware import H100_SXM, profile_for
from sparsecc.cost.sites import estimate_attention
from sparsecc.forms import BlockSparse, BlockTopK, Streaming
from sparsecc.passes.attention_check import SM90_ESTIMATE

ROWS = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "costmodel_h100_sm90.json")


def _form(spec: dict):
    """A row's form, written out here (not through bench/costmodel.py's converter)."""
    if spec["name"] == "streaming":
        return Streaming(spec["sink"], spec["window"])
    assert spec["name"] == "block_sparse", spec
    return BlockSparse(spec["block"], spec["local_blocks"], spec["global_blocks"], spec["random_blocks"],
                       spec["seed"])


def _estimate(form, program, hw=H100_SXM, batch=1, heads=32, kv_heads=8, seq=32768, head_dim=128,
              dtype=torch.bfloat16):
    return estimate_attention(form, None, batch=batch, heads=heads, kv_heads=kv_heads, seq_q=seq, seq_k=seq,
                              head_dim=head_dim, dtype=dtype, causal=True, hw=hw, margin=1.0, symbolic_seq=False,
                              program=program)


def test_each_program_layout_has_its_family():
    assert attention_family(Streaming(128, 4096), "sm90") == "attention_sparse_sm90"
    assert attention_family(BlockSparse(128, 1, 0, 3, 0), "sm90") == "attention_table_sm90"
    assert attention_family(BlockSparse(128, 2, 1, 0, 0), "sm90") == "attention_table_sm90"
    assert attention_family(Streaming(128, 4096)) == "attention_sparse"
    assert attention_family(None, "sm90") == "attention_dense"
    with pytest.raises(ValueError, match="no sm_90 Gluon program runs"):
        attention_family(BlockTopK(block=128, topk=4), "sm90")
    with pytest.raises(ValueError, match=r"'gluon' is not one of \['triton', 'sm90', 'decode'\]"):
        attention_family(Streaming(16, 64), "gluon")


def test_the_shipped_table_predicts_the_measured_programs():
    """Every stored H100 row of the shipped Gluon programs (SDPA and the program timed in one run) is predicted
    within 15% by the shipped table, and the median within 5%; the Triton families predict 1.2-1.4x less."""
    with open(ROWS, encoding="utf-8") as fh:
        data = json.load(fh)
    assert data["device"].startswith("NVIDIA H100") and len(data["rows"]) == 7
    errors = []
    for row in data["rows"]:
        site = row["site"]
        assert site["program"] == "sm90" and row["timing"] == "do_bench"
        args = dict(batch=site["batch"], heads=site["heads"], kv_heads=site["kv_heads"], seq=site["seq"],
                    head_dim=site["head_dim"])
        measured = row["dense_ms"] / row["sparse_ms"]
        predicted = _estimate(_form(site["form"]), "sm90", **args).speedup
        errors.append(abs(predicted - measured) / measured)
        assert errors[-1] < 0.15, (row["label"], predicted, measured)
        triton = _estimate(_form(site["form"]), "triton", **args).speedup
        assert 1.1 < predicted / triton < 1.5, (row["label"], predicted, triton)
    assert statistics.median(errors) < 0.05, errors


def _block():
    from tests import zoo

    torch.manual_seed(0)
    block = zoo.Block(zoo.SdpaAttention, zoo.GatedSiluFFN, hidden=256, heads=2, kv_heads=1, inner=256, bias=False)
    return block.eval().to(torch.float16)


@pytest.mark.parametrize("rule, form, note", [
    ({"form": "streaming", "sink": 16, "window": 64}, Streaming(16, 64), "the Gluon program"),
    ({"form": "block_sparse", "block": 128, "local_blocks": 1, "random_blocks": 1}, BlockSparse(128, 1, 0, 1, 0),
     "the Gluon program over the block table")])
@pytest.mark.parametrize("sm90", [True, False])
def test_check_estimates_the_program_the_site_will_run(rule, form, note, sm90, monkeypatch):
    """With the sm_90 test answered yes, a streaming or 128-block table site's estimate is the Gluon program's (its
    family), the reason says so and the plan names the program; answered no, the Triton kernel's and neither. The
    expected figures come from the cost model asked directly with the site's sizes."""
    import sparsecc

    monkeypatch.setattr(hopper_prefill, "sm90_gluon", lambda device: sm90)
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [rule]}
    torch._dynamo.reset()
    # 2048 rows: enough work that the families' large-size efficiencies, where they differ, enter the estimate
    report = sparsecc.explain(_block(), torch.randn(1, 2048, 256, dtype=torch.float16), spec=spec)
    site = [s for s in report.sites if s.kind == "attention"][0]
    assert site.applied and site.attrs["seq_q"] == 2048 and isinstance(site.attrs["seq_q"], int), site.reason
    args = dict(hw=profile_for(torch.device("cpu")), heads=2, kv_heads=1, seq=2048, dtype=torch.float16)
    expected = _estimate(form, "sm90" if sm90 else "triton", **args)
    other = _estimate(form, "triton" if sm90 else "sm90", **args)
    assert site.estimate.sparse_time_s == pytest.approx(expected.sparse_time_s, rel=1e-9)
    assert site.estimate.sparse_time_s != pytest.approx(other.sparse_time_s, rel=1e-3)
    assert (SM90_ESTIMATE in site.reason) == sm90, site.reason
    assert (f"sm_90 prefill: {note} (codegen/hopper_prefill.py)" in site.attrs["plan"]) == sm90, site.attrs["plan"]


def test_a_site_the_program_does_not_take_keeps_the_triton_estimate(monkeypatch):
    """Rows shorter than one query tile (and kernels='reference') keep the Triton kernel, so the Triton family."""
    import sparsecc

    monkeypatch.setattr(hopper_prefill, "sm90_gluon", lambda device: True)
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [{"form": "streaming", "sink": 16,
                                                                          "window": 64}]}
    for rows, kernels in ((100, "auto"), (256, "reference")):
        torch._dynamo.reset()
        report = sparsecc.explain(_block(), torch.randn(1, rows, 256, dtype=torch.float16), spec=spec,
                                  kernels=kernels)
        site = [s for s in report.sites if s.kind == "attention"][0]
        assert site.applied and site.attrs["seq_q"] == rows, site.reason
        expected = _estimate(Streaming(16, 64), "triton", hw=profile_for(torch.device("cpu")), heads=2, kv_heads=1,
                             seq=rows, dtype=torch.float16)
        assert site.estimate.sparse_time_s == pytest.approx(expected.sparse_time_s, rel=1e-9)
        assert SM90_ESTIMATE not in site.reason and "sm_90 prefill" not in site.attrs["plan"]


def test_a_symbolic_batch_keeps_the_program_and_a_symbolic_length_does_not(monkeypatch):
    """The Gluon rules read the sequence lengths: a batch size known only at run time still runs the program (and is
    estimated for it); a symbolic query length keeps the traced Triton kernels (and their estimate)."""
    import sparsecc

    monkeypatch.setattr(hopper_prefill, "sm90_gluon", lambda device: True)
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [{"form": "streaming", "sink": 16,
                                                                          "window": 64}]}
    for dim, program in ((0, True), (1, False)):
        x = torch.randn(2, 2048, 256, dtype=torch.float16)
        torch._dynamo.mark_dynamic(x, dim)
        torch._dynamo.reset()
        report = sparsecc.explain(_block(), x, spec=spec)
        site = [s for s in report.sites if s.kind == "attention"][0]
        symbolic = "batch" if dim == 0 else "seq_q"
        assert not isinstance(site.attrs[symbolic], int), site.attrs
        assert (SM90_ESTIMATE in site.reason) == program, site.reason
        assert ("sm_90 prefill" in site.attrs["plan"]) == program, site.attrs["plan"]
