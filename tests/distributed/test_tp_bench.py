"""bench/tensor_parallel.py runs its whole protocol on CPUs (gloo, 2 processes, tiny shapes), and its checks refuse
a run that did not measure the spec (sites left dense, heads not split across ranks, TP output apart from TP=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def _site(module, applied=True, holds="0-1", reason="rewritten"):
    return dict(module=module, applied=applied, reason=reason, holds=holds)


def _row(**changes):
    row = dict(seq=96, rel_err=1e-8,
               tp1_sites=[_site("layers.0.self_attn", holds=None), _site("layers.1.self_attn", holds=None)],
               tpn_sites=[[_site("layers.0.self_attn", holds="0-1"), _site("layers.1.self_attn", holds="0-1")],
                          [_site("layers.0.self_attn", holds="2-3"), _site("layers.1.self_attn", holds="2-3")]])
    row.update(changes)
    return row


def test_check_accepts_a_measurement_of_the_spec():
    import tensor_parallel
    assert tensor_parallel.check([_row()], world=2, layers=2) == []


def test_check_refuses_sites_left_dense_split_heads_missing_and_outputs_apart():
    import tensor_parallel
    dense = _row(tpn_sites=[[_site("layers.0.self_attn", holds="0-1"),
                             _site("layers.1.self_attn", applied=False, holds="0-1", reason="auto: dense is faster")],
                            _row()["tpn_sites"][1]])
    problems = tensor_parallel.check([dense], world=2, layers=2)
    assert len(problems) == 1 and "rank 0: 1 of 2 attention sites" in problems[0] and "dense is faster" in problems[0]
    same_heads = _row(tpn_sites=[_row()["tpn_sites"][0], _row()["tpn_sites"][0]])
    assert "not 2 distinct shares" in " ".join(tensor_parallel.check([same_heads], world=2, layers=2))
    apart = _row(rel_err=0.3)
    assert "differs from TP=1" in " ".join(tensor_parallel.check([apart], world=2, layers=2))
    nan = _row(rel_err=float("nan"))
    assert "differs from TP=1" in " ".join(tensor_parallel.check([nan], world=2, layers=2))


def test_smoke_run(tmp_path):
    """The bench end to end on 2 CPU processes: every attention site rewritten on every rank, each rank holding its
    own heads, the TP=2 output equal to TP=1's."""
    pytest.importorskip("transformers")
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "tensor_parallel.py"), "--smoke", "--reps", "2",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["problems"] == []
    (row,) = result["rows"]
    assert row["rel_err"] < 1e-5
    assert [sorted({s["holds"] for s in sites}) for sites in row["tpn_sites"]] == [["0-1"], ["2-3"]]
    assert all(s["applied"] for sites in [row["tp1_sites"], *row["tpn_sites"]] for s in sites)
