"""cuSPARSELt settings planned at compile time for the 2:4 linear (codegen/semi_structured_linear.py,
codegen/linear_ops.py, passes/linear.py).

A static call with a bound operand gets its settings searched by the plan stage and traces into Inductor's graph as
one ``aten._cslt_sparse_mm`` with those settings; anything else stays one opaque op that searches on its first call.
CPU: fake CUDA tensors for the trace, stand-ins for the search and the timer. GPU: tests/codegen/test_inductor_launch.py.
"""

import pytest
import torch

from sparsecc.codegen import linear_ops
from sparsecc.codegen import semi_structured_linear as semi
from sparsecc.codegen.linear_ops import SEMI_STRUCTURED_LINEAR, SemiStructuredLinearArgs
from sparsecc.codegen.semi_structured_linear import CsltConfig

CUDA = torch.device("cuda")


def test_a_planned_call_traces_to_one_cusparselt_product_with_its_settings():
    """On fake CUDA tensors (as Inductor traces it) the planned call is the product alone: no compression, no
    search, the padded token count into cuSPARSELt, the settings as given, the activation after it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    n, k, m = 128, 64, 100
    with FakeTensorMode():
        x = torch.empty(m, k, device=CUDA, dtype=torch.bfloat16)
        values = torch.empty(n, k // 2, device=CUDA, dtype=torch.bfloat16)
        indices = torch.empty(n, k // 4, device=CUDA, dtype=torch.uint8)
        packed = torch.empty(n, 9 * k // 16, device=CUDA, dtype=torch.bfloat16)
        bias = torch.empty(n, device=CUDA, dtype=torch.bfloat16)

        def call(x, values, indices, packed, bias):
            return semi.semi_structured_linear_act(x, values, indices, bias, "silu", packed=packed,
                                                   config=CsltConfig(17, 2, 1))

        graph = make_fx(call)(x, values, indices, packed, bias).graph
    products = [node for node in graph.nodes if node.target is torch.ops.aten._cslt_sparse_mm.default]
    assert len(products) == 1, graph
    product = products[0]
    settings = {**dict(zip(("alg_id", "split_k", semi._split_mode_argument()), product.args[6:])), **product.kwargs}
    assert settings["alg_id"] == 17 and settings["split_k"] == 2 and settings[semi._split_mode_argument()] == 1
    assert tuple(product.meta["val"].shape) == (104, n)   # 100 tokens padded to a multiple of 8
    assert not any("cslt_compress" in str(node.target) for node in graph.nodes)
    output = [node for node in graph.nodes if node.op == "output"][0].args[0]
    assert tuple(output.meta["val"].shape) == (m, n)


def test_launch_mode_follows_the_planned_settings():
    planned = SemiStructuredLinearArgs(out_features=128, in_features=64, alg_id=17, split_k=1, split_k_mode=2)
    assert SEMI_STRUCTURED_LINEAR.launch_mode(planned, CUDA, False) == ("inductor", "")
    launch, why = SEMI_STRUCTURED_LINEAR.launch_mode(SemiStructuredLinearArgs(128, 64), CUDA, False)
    assert launch == "opaque" and "no cuSPARSELt settings planned" in why
    launch, why = SEMI_STRUCTURED_LINEAR.launch_mode(SemiStructuredLinearArgs(128, 64, "reference", 17), CUDA, False)
    assert launch == "opaque" and "reference" in why
    assert SEMI_STRUCTURED_LINEAR.launch_mode(planned, torch.device("cpu"), False)[0] == "opaque"


def test_planned_settings_without_the_operand_are_refused():
    x, values, indices = torch.randn(4, 32), torch.randn(8, 16), torch.zeros(8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="alg_id=17.*packed"):
        linear_ops.semi_structured_linear(x, values, indices, None, 8, 32, "auto", None, 17)


def test_planned_settings_are_searched_once_per_shape(monkeypatch):
    searched = []
    monkeypatch.setattr(semi, "_PLANNED", {})
    monkeypatch.setattr(semi, "search_settings",
                        lambda packed, x2, bias: searched.append((tuple(x2.shape), bias is None)) or CsltConfig(9))
    packed = torch.zeros(16, 18, dtype=torch.bfloat16)
    assert semi.planned_settings(packed, 24, 16, 32, True) == (CsltConfig(9), "searched at compile time for 24 tokens")
    assert semi.planned_settings(packed, 24, 16, 32, True)[0] == CsltConfig(9)
    assert searched == [((24, 32), False)]
    semi.planned_settings(packed, 8, 16, 32, False)
    assert searched[-1] == ((8, 32), True)
    config, how = semi.planned_settings(packed.half(), 24, 16, 32, True)
    assert config == CsltConfig() and "not searched" in how and len(searched) == 2


def test_a_search_during_a_capture_is_not_cached(monkeypatch):
    """A first call inside a CUDA-graph capture runs the default settings and leaves the bucket to be searched on
    the next call outside a capture."""
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(semi, "search_settings", lambda packed, x2, bias: CsltConfig(5))
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


def test_the_operand_is_bound_as_one_row_per_output_feature(monkeypatch):
    """torch's shape function for ``_cslt_sparse_mm`` reads N from the operand's first dimension."""
    from sparsecc.weights import compress
    from sparsecc.forms import TwoFour

    weight = compress(torch.randn(32, 64), TwoFour())
    monkeypatch.setattr(torch, "_cslt_compress", lambda dense: torch.zeros(dense.numel() * 9 // 16))
    packed = semi.cslt_operand(weight, torch.bfloat16)
    assert tuple(packed.shape) == (32, 36) and semi.traced_operand_reason(packed, 32) == ""
    monkeypatch.setattr(torch, "_cslt_compress", lambda dense: torch.zeros(dense.numel() * 9 // 16 + 1))
    packed = semi.cslt_operand(weight, torch.bfloat16)
    assert packed.dim() == 1 and "does not split into 32 rows" in semi.traced_operand_reason(packed, 32)
