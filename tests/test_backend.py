"""The torch.compile backend: entry point, options, Inductor lowering, reports, weight freshness."""

import json

import pytest
import torch

import sparsecc
from sparsecc import SpecError
from tests import zoo


class TinyModel(torch.nn.Module):
    """Attention + gated FFN + linears, to exercise every family through Inductor."""

    def __init__(self):
        super().__init__()
        self.attn = zoo.SdpaAttention()
        self.mlp = zoo.GatedSiluFFN()

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


def _streaming_keep(s: int, sink: int, window: int) -> torch.Tensor:
    """docs/spec.md, causal streaming: query i keeps key j <= i iff j < sink or i - j < window."""
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    return (j <= i) & ((j < sink) | (i - j < window))


def _oracle_tiny(model: TinyModel, x, *, sink: int, window: int, prune_o_proj: bool = False, tau_input=None):
    """TinyModel's output in float64 from docs/spec.md alone: streaming attention on an explicit keep mask, o_proj
    pruned 2:4 by the oracle (tests/oracle), the FFN thresholded by zoo's float64 semantics when ``tau_input``."""
    import copy

    from tests.oracle import oracle

    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        if prune_o_proj:
            pruned, valid = oracle.prune_2_4(ref.attn.o_proj.weight)
            assert bool(valid.all()), "a tie inside a 2:4 group: the spec leaves the choice open"
            ref.attn.o_proj.weight.copy_(pruned)
        h = x.double() + ref.attn.expected(x.double(), _streaming_keep(x.shape[1], sink, window))
        ffn = ref.mlp(h) if tau_input is None else zoo.ffn_expected(ref.mlp, h, "input", tau_input)
    return h + ffn


def test_entry_point_backend_without_spec_equals_eager():
    torch.manual_seed(0)
    model = TinyModel().eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        out = torch.compile(model, backend="sparsecc")(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    report = sparsecc.last_report()
    assert report.sites and all(s.reason == "no rule" for s in report.sites)
    assert {s.kind for s in report.sites} == {"attention", "ffn", "linear"}


def test_inductor_lowering_runs_sparse_ops_and_refreshes_weights(tmp_path):
    torch.manual_seed(1)
    model = TinyModel().eval()
    x = torch.randn(1, 12, 32)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "streaming", "sink": 2, "window": 4}],
            "linear": [{"modules": "attn.o_proj", "form": "2:4"}]}
    path = tmp_path / "report.json"
    with torch.no_grad():
        compiled = torch.compile(model, backend="sparsecc",
                                 options={"spec": spec, "kernels": "reference", "report": str(path)})
        first = compiled(x)
        model.attn.o_proj.weight.mul_(0.5)
        second = compiled(x)
    assert not torch.allclose(first, second)
    data = json.loads(path.read_text())
    applied = {(s["kind"], s["module"]) for s in data["sites"] if s["applied"]}
    assert applied == {("attention", "attn"), ("linear", "attn.o_proj")}
    # the refreshed weight gives docs/spec.md's numbers: the float64 oracle's 2:4 pruning of the new o_proj weight
    # and streaming attention on explicit keep masks (tests/oracle, tests/zoo)
    torch.testing.assert_close(second.double(), _oracle_tiny(model, x, sink=2, window=4, prune_o_proj=True),
                               atol=1e-5, rtol=1e-5)


def _spec_error_in_chain(exc):
    while exc is not None:
        if isinstance(exc, SpecError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.mark.parametrize("options, key", [
    ({"kernels": "cuda"}, "options.kernels"),
    ({"report": "out.txt"}, "options.report"),
    ({"report": 1}, "options.report"),        # equal to True, but not a switch: it used to fail after the compile
    ({"report": 0.0}, "options.report"),
    ({"spec": "missing.toml"}, None),
    ({"cudagraphs": "yes"}, "options.cudagraphs"),
])
def test_bad_options_raise_spec_error(options, key):
    with pytest.raises(SpecError) as info:
        sparsecc.compile(torch.nn.Linear(4, 4), **options)
    if key:
        assert key in str(info.value) and "expected" in str(info.value)


def test_cpp_wrapper_is_a_checked_option_that_patches_inductor():
    from sparsecc.backend import BackendOptions, _lowering_config, parse_options

    with pytest.raises(SpecError, match="options.cpp_wrapper"):
        parse_options({"cpp_wrapper": "yes"})
    opts = parse_options({"cpp_wrapper": True})
    assert opts.cpp_wrapper is True
    assert _lowering_config(opts, cudagraphs=False) == {"cpp_wrapper": True}
    assert _lowering_config(opts, cudagraphs=True) == {"cpp_wrapper": True, "triton.cudagraphs": True}
    assert _lowering_config(BackendOptions(), cudagraphs=False) is None


def test_unknown_option_lists_allowed_keys():
    with pytest.raises(Exception) as info:
        torch.compile(torch.nn.Linear(4, 4), backend="sparsecc", options={"sepc": "x.toml"})(torch.randn(2, 4))
    err = _spec_error_in_chain(info.value)
    assert err is not None
    text = str(err)
    assert "sepc" in text and "'spec'" in text and "'kernels'" in text


@pytest.mark.parametrize("suffix", [".json", ".md", ".html"])
def test_report_files(tmp_path, suffix, eager_lowering):
    model = TinyModel().eval()
    path = tmp_path / f"r{suffix}"
    spec = {"version": 1, "attention": [{"form": "streaming", "sink": 1, "window": 2}]}
    with torch.no_grad():
        sparsecc.compile(model, spec=spec, report=str(path))(torch.randn(1, 8, 32))
    text = path.read_text()
    assert "attention" in text and "streaming" in text


def test_report_true_prints_to_stderr(capsys, eager_lowering):
    with torch.no_grad():
        sparsecc.compile(TinyModel().eval(), report=True)(torch.randn(1, 8, 32))
    err = capsys.readouterr().err
    assert "sparsecc report" in err and "no rule" in err


def test_report_renderers_and_unused_rule_warning():
    spec = {"version": 1, "attention": [{"modules": "nothing.here", "form": "streaming", "sink": 1, "window": 2}]}
    report = sparsecc.explain(TinyModel().eval(), torch.randn(1, 8, 32), spec=spec)
    assert any("attention[0]" in w and "matches no" in w for w in report.warnings)
    assert "<table>" in report.to_html()
    assert "| kind |" in report.to_markdown()
    assert json.loads(report.to_json())["counts"]["linear"] == 7
    assert "est. speedup" in str(report)


@pytest.mark.parametrize("stage", ["replace", "plan"])
def test_a_failing_rewrite_or_plan_falls_back_to_dense(monkeypatch, eager_lowering, stage):
    import dataclasses
    import sparsecc.pipeline as pipeline

    def broken(*args):
        raise RuntimeError(f"synthetic {stage} failure")
    rewrites = tuple(r if r.kind != "attention" else dataclasses.replace(r, **{stage: broken})
                     for r in pipeline.REWRITES)
    monkeypatch.setattr(pipeline, "REWRITES", rewrites)
    model = TinyModel().eval()
    x = torch.randn(1, 8, 32)
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [{"form": "streaming", "sink": 1, "window": 2}]}
    with torch.no_grad():
        out = sparsecc.compile(model, spec=spec)(x)
        ref = model(x)
    torch.testing.assert_close(out, ref)
    site = [s for s in sparsecc.last_report().sites if s.kind == "attention"][0]
    assert not site.applied and f"synthetic {stage} failure" in site.reason
    assert ("the plan failed" if stage == "plan" else "the rewrite failed") in site.reason


def test_the_report_shows_each_sites_plan(eager_lowering):
    model = TinyModel().eval()
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [{"form": "streaming", "sink": 1, "window": 2}]}
    with torch.no_grad():
        sparsecc.compile(model, spec=spec, kernels="reference")(torch.randn(1, 8, 32))
    site = [s for s in sparsecc.last_report().sites if s.kind == "attention"][0]
    assert site.applied
    assert site.attrs["launch"] == "opaque"
    assert site.attrs["plan"] == "streaming_attention: opaque (kernels='reference': the reference runs as one op)"


def test_dynamic_shapes_with_sparse_ops(eager_lowering):
    torch.manual_seed(3)
    model = TinyModel().eval()
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "streaming", "sink": 2, "window": 5}],
            "ffn": [{"form": "activation_threshold", "mode": "input", "threshold": 0.1}]}
    inputs = [torch.randn(1, s, 32) for s in (9, 17, 30)]
    with torch.no_grad():
        compiled = sparsecc.compile(model, spec=spec, kernels="reference", dynamic=True)
        outs = [compiled(x) for x in inputs]
        report = sparsecc.last_report()
        statics = []
        for x in inputs:
            torch._dynamo.reset()
            statics.append(sparsecc.compile(model, spec=spec, kernels="reference", dynamic=False)(x))
    assert all(s.applied for s in report.sites if s.kind in ("attention", "ffn"))
    assert any(not str(s.attrs.get("seq_q", 0)).isdigit() for s in report.sites if s.kind == "attention")
    for out, ref, x in zip(outs, statics, inputs):
        torch.testing.assert_close(out, ref)
        # and both are docs/spec.md's numbers (float64 oracle), not merely each other's
        torch.testing.assert_close(out.double(), _oracle_tiny(model, x, sink=2, window=5, tau_input=0.1),
                                   atol=1e-4, rtol=1e-4)


def test_backend_is_found_without_importing_sparsecc():
    import subprocess
    import sys
    code = ("import sys, torch\n"
            "m = torch.nn.Linear(8, 8)\n"
            "out = torch.compile(m, backend='sparsecc', options={'kernels': 'reference'})(torch.randn(2, 8))\n"
            "assert 'sparsecc' in sys.modules  # loaded through the entry point, not by this script\n"
            "print(out.shape)\n")
    env = {**__import__("os").environ, "SPARSECC_LOWERING": "eager"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([2, 8])" in result.stdout


class _CountingFFN(torch.nn.Module):
    """An FFN site plus state written in place and never read in the graph (a cache's bookkeeping)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("seen", torch.zeros(4, 32))

    def forward(self, x):
        self.calls.add_(1)                                             # in-place method, result unused
        self.seen.index_copy_(0, torch.tensor([0]), x[:1, 0])          # a KV-cache style write
        return self.down(torch.relu(self.up(x)))


def test_in_place_writes_survive_dead_code_elimination(eager_lowering):
    """The rewrite stage's dead-code elimination keeps in-place method calls nobody reads."""
    model = _CountingFFN().eval()
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "mode": "input", "threshold": 0.1}]}
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        compiled = sparsecc.compile(model, spec=spec, kernels="reference", report=False)
        compiled(x)
        compiled(x)
    assert float(model.calls) == 2.0
    torch.testing.assert_close(model.seen[0], x[0, 0])


def test_cudagraphs_option_marks_bound_weights_static(monkeypatch):
    """With cudagraphs=True, Inductor gets cudagraph trees and the bound weights are static inputs.

    On the CPU Inductor skips cudagraphs itself; the result must equal the compile without the option.
    """
    from torch._inductor import compile_fx as inductor

    seen = []
    real = inductor.compile_fx

    def spy(gm, inputs, *args, **kwargs):
        seen.append((kwargs.get("config_patches"), [hasattr(t, "_dynamo_static_input_type") for t in inputs]))
        return real(gm, inputs, *args, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx", spy)
    torch.manual_seed(3)
    model = zoo.ModuleLinear().eval()
    x = torch.randn(3, 32)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    with torch.no_grad():
        plain = sparsecc.compile(model, spec=spec, kernels="reference")(x)
        torch._dynamo.reset()
        graphed = sparsecc.compile(model, spec=spec, kernels="reference", cudagraphs=True)(x)
    torch.testing.assert_close(graphed, plain)
    assert seen[0][0] is None and seen[1][0] == {"triton.cudagraphs": True}
    n_extra = 2  # the 2:4 weight's values and indices, passed after the graph's own inputs
    assert all(seen[1][1][-n_extra:]) and not any(seen[0][1][-n_extra:])


def test_cudagraphs_are_turned_off_for_an_unbound_two_four_site(monkeypatch, caplog):
    """A 2:4 site on CUDA whose cuSPARSELt operand is not bound at compile time would compress its weight on its
    first call, inside the capture: the graph runs without CUDA graphs, with a warning naming the site, and the
    report's plan says why the operand is not bound. (The graph is compiled on the CPU; the decision is then
    asked again of its context as if the inputs were on CUDA, which is what it reads.)"""
    import logging

    import sparsecc.backend as backend

    contexts = []
    real = backend._uses_cudagraphs
    monkeypatch.setattr(backend, "_uses_cudagraphs", lambda opts, ctx: contexts.append((opts, ctx)) or real(opts, ctx))
    torch.manual_seed(3)
    model = zoo.ModuleLinear().eval()
    x = torch.randn(3, 32)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    torch._dynamo.reset()
    with torch.no_grad():
        sparsecc.compile(model, spec=spec, kernels="auto", cudagraphs=True)(x)
    site = [s for s in sparsecc.last_report().sites if s.kind == "linear"][0]
    assert site.applied and "compressed on the first call" in site.attrs["plan"], site.attrs
    (opts, ctx), = contexts
    assert real(opts, ctx)   # on the CPU Inductor skips cudagraphs itself
    monkeypatch.setattr(backend, "_device_of", lambda inputs: torch.device("cuda"))
    with caplog.at_level(logging.WARNING, logger=backend.log.name):
        assert not real(opts, ctx)
    assert "proj" in caplog.text and "no cuSPARSELt operand bound" in caplog.text
    for decision in ctx.decisions.values():   # bound, the same site keeps CUDA graphs
        if decision.plan is not None:
            decision.plan.state["cslt_operand"] = torch.zeros(1)
    assert real(opts, ctx)


def test_rewritten_graph_keeps_what_inductor_needs_to_find_static_inputs():
    """The rewritten graph keeps Dynamo's compile id, parameter sources and placeholder sources.

    From them Inductor learns which inputs are static: the parameters, a cache
    tensor marked with mark_static_address (which the graph updates in place),
    and the weights sparsecc binds. Losing them made CUDA graphs copy every
    weight on each replay and refuse graphs that update a static cache.
    """
    from sparsecc.backend import rewritten_graphs

    torch.manual_seed(5)
    model = zoo.StaticCacheUpdate().eval()
    cache = torch.zeros(3, 32)
    torch._dynamo.mark_static_address(cache)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    torch._dynamo.reset()
    with torch.no_grad():
        out = sparsecc.compile(model, spec=spec, kernels="reference")(torch.randn(3, 32), cache)
    assert out.shape == (3, 32) and float(cache[0, 0]) == 1.0
    gm = rewritten_graphs()[-1]
    assert "dynamo_compile_id" in gm.meta and hasattr(gm, "_param_name_to_source")
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    assert all(hasattr(p, "_dynamo_source") for p in placeholders)
    static = {p.name for p in placeholders if p.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")}
    bound = {p.name for p in placeholders if p._dynamo_source is None}
    assert len(bound) == 2 and bound <= static   # the 2:4 values and indices
    names = {p.name: p._dynamo_source.name for p in placeholders if p._dynamo_source is not None}
    names = {k: v() if callable(v) else v for k, v in names.items()}   # a method before torch 2.12
    cache_nodes = [p for p in placeholders if "cache" in names.get(p.name, "")]
    assert len(cache_nodes) == 1 and cache_nodes[0].name in static


def test_sites_decided_for_replay_are_decided_again_when_the_graph_cannot_replay(monkeypatch, caplog):
    """With cudagraphs=True on CUDA the sites are first decided for CUDA-graph replay (no per-call host floors);
    when a decided site then keeps the graph from CUDA graphs (here an unbound 2:4 operand), they are decided
    again for plain calls, and the report's estimates are the plain-call ones. (Compiled on the CPU, with the
    graph's device answered as CUDA and the H200's figures.)"""
    import logging

    import sparsecc.backend as backend
    from sparsecc.cost.hardware import H200
    from sparsecc.cost.sites import estimate_linear
    from sparsecc.forms import TwoFour

    replayed = []
    make = backend.make_context

    def recording(*args, **kwargs):
        ctx = make(*args, **kwargs)
        replayed.append(ctx.replayed)
        return ctx

    monkeypatch.setattr(backend, "make_context", recording)
    monkeypatch.setattr(backend, "_device_of", lambda inputs: torch.device("cuda"))
    monkeypatch.setattr(backend, "profile_for", lambda device: H200)
    torch.manual_seed(3)
    model = zoo.ModuleLinear().eval()
    x = torch.randn(3, 32)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=backend.log.name):
        sparsecc.compile(model, spec=spec, kernels="auto", cudagraphs=True)(x)
    assert replayed == [True, False]
    assert caplog.text.count("no cuSPARSELt operand bound") == 1
    site = [s for s in sparsecc.last_report().sites if s.kind == "linear"][0]
    assert site.applied and "compressed on the first call" in site.attrs["plan"]
    lin = model.proj
    plain, replay = (estimate_linear(TwoFour(), tokens=3, in_features=lin.in_features, out_features=lin.out_features,
                                     dtype=torch.float32, hw=H200, replayed=r) for r in (False, True))
    assert site.estimate.sparse_time_s == pytest.approx(plain.sparse_time_s, rel=1e-9)
    assert plain.sparse_time_s != pytest.approx(replay.sparse_time_s, rel=1e-3)
