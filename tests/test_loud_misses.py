"""Misses are loud: every compile warns with its summary; reports describe the compile that wrote them."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsecc
from sparsecc import SparseccWarning, SpecError
from tests import zoo

X = torch.randn(1, 8, 32)
STREAMING = {"version": 1, "attention": [{"form": "streaming", "sink": 1, "window": 2, "policy": "force"}]}
NOWHERE = {"version": 1, "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": 1,
                                        "window": 2}]}


def _compile_and_run(model, **kwargs):
    with torch.no_grad():
        return sparsecc.compile(model, kernels="reference", **kwargs)(X)


def test_every_compile_warns_with_its_summary(eager_lowering):
    with pytest.warns(SparseccWarning, match=r"0/\d+ sites rewritten .*rules that matched nothing: "
                                             r"attention\[0\] \(modules='model.layers.\*.self_attn'\)"):
        _compile_and_run(zoo.SdpaAttention().eval(), spec=NOWHERE)
    torch._dynamo.reset()
    with pytest.warns(SparseccWarning, match=r"1/5 sites rewritten \(attention 1/1, linear 0/4\); "
                                             r"rules that matched nothing: none"):
        _compile_and_run(zoo.SdpaAttention().eval(), spec=STREAMING)


def test_the_summary_names_the_spec_file_of_the_rules_that_matched_nothing(tmp_path, eager_lowering):
    """The summary is one log line, read without the report's header: it says which file the keys are in."""
    path = tmp_path / "model.toml"
    path.write_text('version = 1\n[[attention]]\nmodules = "nope.*"\nform = "streaming"\nsink = 1\nwindow = 2\n')
    with pytest.warns(SparseccWarning) as caught:
        _compile_and_run(zoo.SdpaAttention().eval(), spec=str(path))
    (summary,) = [str(w.message) for w in caught if isinstance(w.message, SparseccWarning)]
    assert summary.endswith(f"rules that matched nothing: attention[0] (modules='nope.*') (spec {path})"), summary
    torch._dynamo.reset()
    with pytest.warns(SparseccWarning, match=r"attention\[0\] \(modules='nope\.\*'\) \(spec <inline spec>\)"):
        _compile_and_run(zoo.SdpaAttention().eval(), spec={"version": 1, "attention": [
            {"modules": "nope.*", "form": "streaming", "sink": 1, "window": 2}]})


def test_a_rule_naming_modules_without_sites_is_told_from_a_typo(eager_lowering):
    """A glob that names modules of the model, none holding a site of its kind (an FFN rule on an attention
    block, as on MoE experts), is not a typo: the summary names one such module; a typo names none."""
    spec = {"version": 1, "ffn": [{"modules": "q_proj", "form": "activation_threshold", "mode": "gate",
                                   "threshold": 0.1, "policy": "force"},
                                  {"modules": "q_porj", "form": "activation_threshold", "mode": "gate",
                                   "threshold": 0.1, "policy": "force"}]}
    _compile_and_run(zoo.SdpaAttention().eval(), spec=spec)
    assert sparsecc.last_report().unmatched_rules() == [
        "ffn[0] (modules='q_proj': names module 'q_proj', but no ffn site is in it)",
        "ffn[1] (modules='q_porj')"]
    torch._dynamo.reset()   # a linear rule naming the parent of linear sites: they sit deeper, and it says so
    block = zoo.Block(zoo.SdpaAttention, zoo.GatedSiluFFN, hidden=32, heads=4, kv_heads=2, inner=64, bias=False)
    _compile_and_run(block.eval(), spec={"version": 1, "linear": [{"modules": "mlp", "form": "2:4",
                                                                    "policy": "force"}]})
    (entry,) = sparsecc.last_report().unmatched_rules()
    assert entry.startswith("linear[0] (modules='mlp': names module 'mlp', whose linear sites sit deeper (e.g. "
                            "'mlp.gate_proj')")


def test_a_catch_all_rule_without_sites_names_the_whole_model(eager_lowering):
    spec = {"version": 1, "ffn": [{"modules": "*", "form": "activation_threshold", "mode": "gate",
                                   "threshold": 0.1, "policy": "force"}]}
    _compile_and_run(zoo.SdpaAttention().eval(), spec=spec)
    assert sparsecc.last_report().unmatched_rules() == [
        "ffn[0] (modules='*': names the whole model (module ''), but no ffn site is in it)"]


class StackedExperts(torch.nn.Module):
    """Mixture-of-experts weights stored stacked, [experts, out, in], as current transformers stores them."""

    def __init__(self, experts=4, hidden=32, inner=16):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * inner, hidden) / hidden ** 0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, inner) / inner ** 0.5)

    def forward(self, x, routing):
        gate, up = torch.einsum("td,eod->teo", x, self.gate_up_proj).chunk(2, dim=-1)
        out = torch.einsum("tei,edi->ted", torch.nn.functional.silu(gate) * up, self.down_proj)
        return (out * routing[..., None]).sum(1)


class TinyMoE(torch.nn.Module):
    def __init__(self, hidden=32, experts=4):
        super().__init__()
        self.conv = torch.nn.Conv1d(hidden, hidden, 3, padding=1)   # a 3-D weight that is not stacked experts
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = StackedExperts(experts, hidden)

    def forward(self, x):
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        flat = x.reshape(-1, x.shape[-1])
        return self.experts(flat, self.router(flat).softmax(-1)).view_as(x)


@pytest.mark.parametrize("kind, form", [("ffn", {"form": "activation_threshold", "mode": "input", "threshold": 0.1}),
                                        ("linear", {"form": "2:4"})])
def test_rules_covering_stacked_expert_weights_say_they_stay_dense(kind, form, eager_lowering):
    """No form reaches weights stacked per expert: a rule covering them says so, whether or not it matched other
    sites, and the experts compute what the model computes."""
    torch.manual_seed(0)
    model = TinyMoE().eval()
    spec = {"version": 1, "defaults": {"policy": "force"}, kind: [{"modules": "*", **form}]}
    with torch.no_grad():
        expected = model(X)
        with pytest.warns(SparseccWarning) as caught:
            out = sparsecc.compile(model, spec=spec, kernels="reference")(X)
    report = sparsecc.last_report()
    note = (f"{kind}[0] (modules='*') covers experts (gate_up_proj [4, 32, 32], down_proj [4, 32, 16]): weights "
            f"stacked per expert (mixture-of-experts) are reached by no {kind} form, so those experts run dense")
    assert note in report.notes and not any("conv" in n for n in report.notes), report.notes
    assert any(note[:60] in str(w.message) for w in caught)
    if kind == "linear":   # the router is an ordinary linear site: pruned 2:4, so only compare the experts' path
        assert [(s.module, s.applied) for s in report.sites if s.kind == "linear"] == [("router", True)]
    else:
        assert report.unmatched_rules() == [
            "ffn[0] (modules='*': names module 'experts', but no ffn site is in it)"]
        torch.testing.assert_close(out, expected)


def test_the_summary_also_goes_to_the_logger_without_report(caplog, eager_lowering):
    with caplog.at_level(logging.WARNING, logger="sparsecc"):
        _compile_and_run(zoo.SdpaAttention().eval(), spec=NOWHERE)
    lines = [r for r in caplog.records if r.name == "sparsecc" and "sites rewritten" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "attention[0]" in lines[0].getMessage()


def test_no_spec_says_so():
    with pytest.warns(SparseccWarning, match="no spec given"):
        with torch.no_grad():
            torch.compile(zoo.SdpaAttention().eval(), backend="sparsecc")(X)


@pytest.mark.parametrize("setting", ["sparsecc", "+sparsecc"])
def test_torch_logs_knows_sparsecc(setting, tmp_path):
    script = textwrap.dedent("""
        import torch, sparsecc
        from tests import zoo
        with torch.no_grad():
            torch.compile(zoo.SdpaAttention().eval(), backend="sparsecc")(torch.randn(1, 8, 32))
        from torch._logging import _internal
        print("registered", _internal.log_registry.is_log("sparsecc"))
        print("level", __import__("logging").getLogger("sparsecc").getEffectiveLevel())
    """)
    env = {**os.environ, "TORCH_LOGS": setting, "SPARSECC_LOWERING": "eager", "PYTHONWARNINGS": "ignore"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "registered True" in out.stdout
    assert f"level {logging.DEBUG if setting.startswith('+') else logging.INFO}" in out.stdout
    assert "sites rewritten" in out.stderr


def test_a_report_file_describes_only_the_compile_that_wrote_it(tmp_path, eager_lowering):
    path = tmp_path / "r.json"
    _compile_and_run(zoo.SdpaAttention().eval(), spec=STREAMING, report=str(path))
    first = json.loads(path.read_text())
    torch._dynamo.reset()
    _compile_and_run(zoo.GatedSiluFFN().eval(), spec=STREAMING, report=str(path))
    second = json.loads(path.read_text())
    assert {s["kind"] for s in first["sites"]} == {"attention", "linear"}
    assert {s["kind"] for s in second["sites"]} == {"ffn", "linear"}
    assert len(second["sites"]) == 4


def test_a_recompile_does_not_duplicate_sites(tmp_path, eager_lowering):
    path = tmp_path / "r.json"
    model = zoo.SdpaAttention().eval()
    compiled = sparsecc.compile(model, spec=STREAMING, kernels="reference", report=str(path), dynamic=False)
    with torch.no_grad():
        compiled(torch.randn(1, 8, 32))
        compiled(torch.randn(1, 12, 32))     # a new static shape: Dynamo recompiles the same frame
    report = json.loads(path.read_text())
    assert report["graphs"] == 2
    assert sorted(s["kind"] for s in report["sites"]) == ["attention", "linear", "linear", "linear", "linear"]
    assert report["sites"][0]["shapes"]["q"][2] == 12   # the latest graph's sites
    assert any("recompile" in w for w in report["warnings"])


@pytest.mark.parametrize("where", ["missing-folder", "a-folder", "read-only"])
def test_unwritable_report_paths_are_rejected_with_the_options(tmp_path, where):
    if where == "missing-folder":
        path = tmp_path / "no" / "such" / "r.json"
    elif where == "a-folder":
        path = tmp_path / "r.json"
        path.mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes read-only folders")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        path = folder / "r.json"
    with pytest.raises(SpecError, match="options.report"):
        sparsecc.compile(zoo.SdpaAttention(), report=str(path))


def test_report_true_prints_once_with_logging_configured(capsys, eager_lowering):
    logger = logging.getLogger("sparsecc")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        _compile_and_run(zoo.SdpaAttention().eval(), spec=STREAMING, report=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    err = capsys.readouterr().err
    assert err.count("sparsecc report:") == 1


def test_heads_that_do_not_exist_are_in_the_warning(eager_lowering):
    """A rule naming heads the model does not have (a spec written for another model) is said at every compile,
    not only in a site's reason; the head that exists still takes the rule."""
    spec = {"version": 1, "attention": [{"form": "streaming", "sink": 1, "window": 2, "heads": [1, 7, 9],
                                         "policy": "force"}]}
    with pytest.warns(SparseccWarning, match=r"attention\[0\] names heads \[7, 9\], which attention sites of 4 "
                                             r"heads \(0-3\) do not have; they are ignored"):
        _compile_and_run(zoo.SdpaAttention().eval(), spec=spec)
    (site,) = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert site.applied, site.reason


def test_the_summary_carries_a_few_notes_cut_short():
    """The summary is warned and logged at every compile: the first notes only, each bounded, and how many more."""
    from sparsecc.report.model import SUMMARY_NOTE_CHARS, SUMMARY_NOTES, Report

    notes = [f"note {i} " + "x" * 500 for i in range(SUMMARY_NOTES + 2)]
    line = Report(notes=notes).summary()
    assert all(f"note {i} " in line for i in range(SUMMARY_NOTES))
    assert f"note {SUMMARY_NOTES} " not in line and "; 2 more note(s) in the report" in line
    assert len(line) < 200 + SUMMARY_NOTES * (SUMMARY_NOTE_CHARS + 2) + 40


def test_a_disabled_compile_says_so_in_its_report(eager_lowering):
    """torch.compile(disable=True) compiles nothing: the compile's report names its spec and says why it is empty
    (not "no spec given")."""
    _compile_and_run(zoo.SdpaAttention().eval(), spec=STREAMING, disable=True)
    report = sparsecc.last_report()
    assert report.spec == "<inline spec>" and not report.sites
    assert "disable=True" in report.summary() and "no spec given" not in report.summary()


@pytest.mark.parametrize("second, overridden", [
    ({"form": "streaming", "sink": 2, "window": 2}, ["attention[0]"]),     # a duplicated rule: the first does nothing
    ({"modules": "*", "form": "dense"}, ["attention[0]"]),                  # a catch-all after it
    ({"form": "dense", "heads": [2, 3]}, []),                               # another rule for other heads: both act
])
def test_a_rule_that_later_rules_override_everywhere_is_named(second, overridden, eager_lowering):
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "streaming", "sink": 1, "window": 2,
                           **({"heads": [0, 1]} if "heads" in second else {})}, second]}
    _compile_and_run(zoo.SdpaAttention().eval(), spec=spec)
    report = sparsecc.last_report()
    assert report.overridden_rules() == overridden
    assert ("override at every site they cover: attention[0]" in report.summary()) == bool(overridden)


@pytest.mark.parametrize("second, overridden", [
    ({"form": "streaming", "sink": 2, "window": 2, "heads": [1, 2]}, []),   # may decide heads 1-2, the first the rest
    ({"form": "dense"}, ["attention[0]"]),                                  # a later rule for the whole site
    ({"form": "dense", "phase": "decode"}, []),                             # the first may still decide prefill
    ({"form": "dense", "phase": "decode", "first": {"phase": "decode"}}, ["attention[0]"]),
    ({"form": "dense", "heads": [0, 1, 2], "first": {"heads": [0, 1]}}, ["attention[0]"]),   # every head it names
])
def test_a_refused_site_without_a_head_count_names_only_rules_overridden_everywhere(second, overridden,
                                                                                      eager_lowering):
    """A refused attention site has no head or query count: a later rule overrides the rule before it only when it
    takes every head and every phase that rule names."""
    second = dict(second)
    first = {"form": "streaming", "sink": 1, "window": 2, **second.pop("first", {})}
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [first, second]}
    _compile_and_run(zoo.ReusedLogitsAttention().eval(), spec=spec)
    report = sparsecc.last_report()
    (site,) = [s for s in report.sites if s.kind == "attention"]
    assert not site.applied and site.reason.startswith("not rewritable"), site.reason
    assert report.overridden_rules() == overridden
    assert ("override at every site they cover: attention[0]" in report.summary()) == bool(overridden)


def test_a_rule_for_another_phase_is_not_called_overridden(eager_lowering):
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "streaming", "sink": 1, "window": 2, "phase": "decode"}]}
    _compile_and_run(zoo.SdpaAttention().eval(), spec=spec)   # a prefill call only
    assert sparsecc.last_report().overridden_rules() == []
