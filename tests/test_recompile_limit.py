"""Compiling one model class many times in one process (trying specs, a tuning loop) compiles every time.

Dynamo keeps compiles on the code object and runs a code eagerly past ``config.recompile_limit`` (8) compiles of
it; every compile of one class shares that code, and every HF model shares transformers' forward wrapper. The
conftest resets Dynamo before each test, so each test below reaches the limit within itself. Where sparsecc cannot
give a compile its own limit (``torch.compile(..., backend="sparsecc")`` used directly; ``sparsecc.compile`` on a
torch without ``isolate_recompiles``) the frame that runs without sparsecc is a loud ``SparseccWarning``, and
``last_report()`` is never the previous compile's.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc
import sparsecc.api as api
from sparsecc import SparseccWarning
from tests.models.streaming_oracle import streaming_reference

COMPILES = 10            # past Dynamo's recompile_limit (8)
SEQ, SINK = 24, 2


def _spec(modules, window):
    return {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"modules": modules, "form": "streaming", "sink": SINK, "window": window}]}


def _windows():
    return [4 + n for n in range(1, COMPILES + 1)]   # all below SEQ: every compile differs from dense


def _keep(sq, sk, sink, window):
    """docs/spec.md's causal streaming rule: the query at position p keeps key j iff j <= p and (j < sink or
    p - j < window)."""
    p = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    return (j <= p) & ((j < sink) | (p - j < window))


class Attn(nn.Module):
    def __init__(self, hidden=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, x):
        return x + self.attn(x)


def _net_oracle(net, x, window):
    """``net`` with its attention computed in float64 on the explicit streaming keep mask."""
    attn = net.attn
    b, n, d = x.shape
    qkv = attn.qkv(x).double().view(b, n, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv
    logits = (q @ k.transpose(-1, -2)) * (d // attn.heads) ** -0.5
    probs = torch.softmax(logits.masked_fill(~_keep(n, n, SINK, window), float("-inf")), -1)
    return (x.double() + (probs @ v).transpose(1, 2).reshape(b, n, d)).float()


def _attention_sites(report):
    return [s for s in report.sites if s.kind == "attention"]


def _assert_report_is(report, modules, window):
    sites = _attention_sites(report)
    assert sorted(s.module for s in sites) == modules
    for site in sites:
        assert site.applied, site.reason
        assert site.form_detail == f"streaming(sink={SINK}, window={window})", site.form_detail


def _no_sparsecc_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, SparseccWarning)
            and "without sparsecc" in str(w.message)]


@pytest.fixture
def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hf_model_compiled_ten_times_runs_each_spec(eager_lowering, llama):
    ids = torch.randint(3, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))
    oracle = copy.deepcopy(llama)
    with torch.no_grad():
        dense = llama(ids).logits
    previous = None
    for window in _windows():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = sparsecc.compile(llama, spec=_spec("model.layers.*.self_attn", window), kernels="reference")
            with torch.no_grad():
                out = compiled(ids).logits
                expected = streaming_reference(oracle, SINK, window)(ids).logits
        assert not _no_sparsecc_warnings(caught)
        assert (out - dense).abs().max() > 1e-3, f"window {window}: the compile ran the dense model"
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=f"window {window}")
        report = sparsecc.last_report()
        assert report is not previous
        _assert_report_is(report, ["model.layers.0.self_attn", "model.layers.1.self_attn"], window)
        # after the first call the copy calls the compiled forward directly (the checking wrapper stepped aside)
        assert hasattr(compiled.__dict__["forward"], "_torchdynamo_orig_callable")
        previous = report


def test_module_compiled_ten_times_runs_each_spec(eager_lowering):
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, SEQ, 32)
    with torch.no_grad():
        dense = net(x)
    for window in _windows():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = sparsecc.compile(net, spec=_spec("attn", window), kernels="reference")
            with torch.no_grad():
                out = compiled(x)
        assert not _no_sparsecc_warnings(caught)
        assert (out - dense).abs().max() > 1e-3, f"window {window}: the compile ran the dense model"
        torch.testing.assert_close(out, _net_oracle(net, x, window), rtol=1e-5, atol=1e-5, msg=f"window {window}")
        _assert_report_is(sparsecc.last_report(), ["attn"], window)
        assert not compiled._forward_hooks   # the first-call check removed itself


def test_hf_model_without_isolated_recompiles_still_compiles_every_time(eager_lowering, llama, monkeypatch):
    """On a torch without ``isolate_recompiles``, each HF compile's forward has a code object of its own."""
    monkeypatch.setattr(api, "_isolates_recompiles", lambda: False)
    ids = torch.randint(3, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))
    oracle = copy.deepcopy(llama)
    for window in _windows():
        compiled = sparsecc.compile(llama, spec=_spec("model.layers.*.self_attn", window), kernels="reference")
        with torch.no_grad():
            out = compiled(ids).logits
            expected = streaming_reference(oracle, SINK, window)(ids).logits
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=f"window {window}")
        _assert_report_is(sparsecc.last_report(), ["model.layers.0.self_attn", "model.layers.1.self_attn"], window)


def test_module_past_the_limit_without_isolation_warns_and_reports_nothing(eager_lowering, monkeypatch):
    """Where the compile cannot get its own limit, the call that ran without sparsecc says so, once, and
    ``last_report()`` is the new compile's empty report (with that note), not the previous compile's."""
    monkeypatch.setattr(api, "_isolates_recompiles", lambda: False)
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, SEQ, 32)
    with torch.no_grad():
        dense = net(x)
    for n, window in enumerate(_windows()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = sparsecc.compile(net, spec=_spec("attn", window), kernels="reference")
            with torch.no_grad():
                out = compiled(x)
                compiled(x)
        loud = _no_sparsecc_warnings(caught)
        report = sparsecc.last_report()
        if n < 8:
            assert not loud
            _assert_report_is(report, ["attn"], window)
            continue
        assert len(loud) == 1, loud   # once per compile, not per call
        assert "recompile_limit" in loud[0] and "torch._dynamo.reset()" in loud[0]
        assert torch.equal(out, dense)   # what Dynamo ran: the model, eagerly
        assert report.sites == [] and report.graphs == 0
        assert any("without sparsecc" in note for note in report.notes)


def test_direct_torch_compile_past_the_limit_warns(eager_lowering):
    """``torch.compile(model, backend="sparsecc")`` used directly: the frame Dynamo stops compiling is a
    SparseccWarning, and ``last_report()`` no longer lists the previous compile's sites."""
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, SEQ, 32)
    loud = []
    for n, window in enumerate(_windows()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = torch.compile(net, backend="sparsecc",
                                     options={"spec": _spec("attn", window), "kernels": "reference"})
            with torch.no_grad():
                compiled(x)
        loud.append(_no_sparsecc_warnings(caught))
        if n < 8:
            assert not loud[-1]
            _assert_report_is(sparsecc.last_report(), ["attn"], window)
    assert len(loud[8]) == 1 and "recompile_limit" in loud[8][0]
    assert _attention_sites(sparsecc.last_report()) == []


def test_same_spec_twice_and_a_call_before_the_first_check_do_not_warn(eager_lowering):
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, SEQ, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = sparsecc.compile(net, spec=_spec("attn", 6), kernels="reference")
        second = sparsecc.compile(net, spec=_spec("attn", 6), kernels="reference")
        assert sparsecc.last_report().sites == []   # second's, not yet compiled
        with torch.no_grad():
            a, b = first(x), second(x)
    assert not _no_sparsecc_warnings(caught)
    torch.testing.assert_close(a, b)
    _assert_report_is(sparsecc.last_report(), ["attn"], 6)


def test_layer_frames_past_the_limit_are_named_in_a_warning(eager_lowering):
    """A graph break inside every layer: each layer's frame is compiled per layer, and each compile adds entries
    to the layers' shared code. Once Dynamo stops compiling those frames (its accumulated limit, lowered here),
    the layers it did not compile run dense: the first call says so, naming the frame, although other graphs of
    the compile reached sparsecc."""
    from tests.passes.test_module_paths import BrokenNet

    torch.manual_seed(0)
    net = BrokenNet().eval()
    x = torch.randn(1, 24, 32)
    loud = []
    with torch._dynamo.config.patch(accumulated_recompile_limit=5):
        for window in (4, 5, 6):
            spec = {"version": 1, "attention": [{"modules": "layers.*.attn", "form": "streaming", "sink": 1,
                                                 "window": window, "policy": "force"}]}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                compiled = sparsecc.compile(net, spec=spec, kernels="reference")
                with torch.no_grad():
                    compiled(x)
            applied = [s.module for s in sparsecc.last_report().sites if s.applied]
            loud.append((applied, [str(w.message) for w in caught if "without sparsecc" in str(w.message)]))
    assert loud[0] == (["layers.0.attn", "layers.1.attn"], [])
    applied, messages = loud[2]
    assert len(applied) < 2   # the limit was reached: a layer ran dense ...
    assert messages and "part of the compiled model ran without sparsecc" in messages[0]   # ... and it is said
    assert "forward" in messages[0]
