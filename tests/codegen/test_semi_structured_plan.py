"""cuSPARSELt settings planned at compile time for the 2:4 linear (codegen/semi_structured_linear.py,
codegen/linear_ops.py, passes/linear.py).

A static call with a bound operand gets its settings searched by the plan stage and passed to the op; anything else
searches on its first call of a token bucket. CPU: stand-ins for the search and the timer.
GPU: tests/test_gpu_pipeline.py.
"""

import pytest
import torch

from sparsecc.codegen import linear_ops
from sparsecc.codegen import semi_structured_linear as semi
from sparsecc.codegen.linear_ops import SEMI_STRUCTURED_LINEAR, SemiStructuredLinearArgs
from sparsecc.codegen.semi_structured_linear import CsltConfig

CUDA = torch.device("cuda")


def test_the_op_stays_opaque_and_says_why():
    planned = SemiStructuredLinearArgs(out_features=128, in_features=64, alg_id=17, split_k=1, split_k_mode=2)
    launch, why = SEMI_STRUCTURED_LINEAR.launch_mode(planned, CUDA, False)
    assert launch == "opaque" and "plans kept on the host" in why


def test_planned_settings_without_the_operand_are_refused():
    x, values, indices = torch.randn(4, 32), torch.randn(8, 16), torch.zeros(8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="alg_id=17.*packed"):
        linear_ops.semi_structured_linear(x, values, indices, None, 8, 32, "auto", None, 17)


def test_planned_settings_are_searched_once_per_shape(monkeypatch):
    searched = []
    monkeypatch.setattr(semi, "_PLANNED", {})
    monkeypatch.setattr(semi, "search_settings",
                        lambda packed, x2, bias, n=None: searched.append((tuple(x2.shape), bias is None, n))
                        or CsltConfig(9))
    packed = torch.zeros(16, 18, dtype=torch.bfloat16)
    assert semi.planned_settings(packed, 24, 16, 32, True) == (CsltConfig(9), "searched at compile time for 24 tokens")
    assert semi.planned_settings(packed, 24, 16, 32, True)[0] == CsltConfig(9)
    assert searched == [((24, 32), False, 16)]
    semi.planned_settings(packed, 8, 16, 32, False)
    assert searched[-1] == ((8, 32), True, 16)
    config, how = semi.planned_settings(packed.half(), 24, 16, 32, True)
    assert config == CsltConfig() and "not searched" in how and len(searched) == 2


def test_a_search_during_a_capture_is_not_cached(monkeypatch):
    """A first call inside a CUDA-graph capture runs the default settings and leaves the bucket to be searched on
    the next call outside a capture."""
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(semi, "search_settings", lambda packed, x2, bias, n=None: CsltConfig(5))
    entry = semi._Entry(values=None, indices=None, versions=(0, 0), dtype=torch.bfloat16, packed=torch.zeros(1),
                        dense=None)
    x2 = torch.zeros(6, 32, dtype=torch.bfloat16)
    assert semi._algorithm(entry, x2, None) == CsltConfig() and not entry.algs
    capturing[0] = False
    assert semi._algorithm(entry, x2, None) == CsltConfig(5) and entry.algs == {8: CsltConfig(5)}


def test_candidates_are_timed_over_back_to_back_calls(monkeypatch):
    """One sample is CALLS_PER_SAMPLE calls between two events, divided by the count (the device's steady state)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(semi, "call_seconds", lambda fn, device: (fn(), 2.0)[1])
    assert semi.steady_call_seconds(lambda: calls.append(1)) == 2.0 / semi.CALLS_PER_SAMPLE
    assert len(calls) == semi.CALLS_PER_SAMPLE


def test_without_kept_plans_a_plain_2to4_call_costs_torchs_per_call_plan(monkeypatch):
    """The cost model's gemm_2to4 floor assumes kept plans; where the library cannot keep them, a plain call on CUDA
    is estimated at no less than torch's op's host time per call (448-686 us measured), and a replay is not."""
    import sparsecc.passes.linear as linear_pass
    from sparsecc.codegen.cusparselt_plan import TORCH_OP_HOST_S
    from sparsecc.cost import H100_SXM, estimate_linear
    from sparsecc.forms import TwoFour

    estimate = estimate_linear(TwoFour(), tokens=64, in_features=4096, out_features=14336, dtype=torch.bfloat16,
                               hw=H100_SXM)
    assert estimate.sparse_time_s < TORCH_OP_HOST_S   # the fitted floor: far below torch's per-call plan
    monkeypatch.setattr(linear_pass, "plans_unavailable_reason", lambda: "cuSPARSELt 600 is older than 701")
    assert linear_pass.two_four_host_floor(estimate, CUDA, False).sparse_time_s == TORCH_OP_HOST_S
    assert linear_pass.two_four_host_floor(estimate, CUDA, True) == estimate
    assert linear_pass.two_four_host_floor(estimate, torch.device("cpu"), False) == estimate
    monkeypatch.setattr(linear_pass, "plans_unavailable_reason", lambda: "")
    assert linear_pass.two_four_host_floor(estimate, CUDA, False) == estimate
