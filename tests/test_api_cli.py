"""calibrate(), the CLI, and explain() on a factory."""

import json
import subprocess
from pathlib import Path
import sys

import pytest
import torch

import sparsecc
from sparsecc import cli
from tests import zoo


def build_two_mlps():
    """CLI factory: a model and its example input."""
    torch.manual_seed(0)
    return zoo.TwoMlps().eval(), (torch.randn(2, 6, 32),)


@pytest.mark.parametrize("mode", ["input", "gate"])
def test_calibrate_hits_the_target_sparsity(mode, tmp_path):
    torch.manual_seed(0)
    model = zoo.TwoMlps().eval()
    batches = [(torch.randn(4, 16, 32),) for _ in range(3)]
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"modules": "layers.*", "form": "activation_threshold", "mode": mode, "sparsity": 0.6}]}
    calibrated = sparsecc.calibrate(model, batches, spec, progress=False)
    new = calibrated.ffn[1:]
    assert sorted(r.modules for r in new) == ["layers.0", "layers.1"]
    # measured sparsity of the thresholded input on fresh data is close to the target
    rule0 = [r for r in new if r.modules == "layers.0"][0]
    x = torch.randn(4, 16, 32)
    with torch.no_grad():
        if mode == "input":
            tau = rule0.form.tau("input")
            measured = (x.abs() <= tau).float().mean().item()
        else:
            tau = rule0.form.tau("gate")
            a = torch.nn.functional.silu(model.layers[0].gate_proj(x))
            measured = (a.abs() <= tau).float().mean().item()
    assert abs(measured - 0.6) < 0.05
    # the calibrated spec saves, loads back, and compiles with every FFN applied
    path = tmp_path / "calibrated.toml"
    calibrated.save(path)
    report = sparsecc.explain(model, x, spec=str(path))
    assert [s.applied for s in report.sites if s.kind == "ffn"] == [True, True]


def test_calibrate_without_targets_returns_spec_unchanged_and_says_so():
    spec = sparsecc.load_spec({"version": 1, "ffn": [{"form": "activation_threshold", "threshold": 0.1}]})
    with pytest.warns(sparsecc.SparseccWarning, match="nothing calibrated.*no activation_threshold rule gives a "
                                                     "sparsity target"):
        assert sparsecc.calibrate(zoo.TwoMlps().eval(), [torch.randn(1, 4, 32)], spec, progress=False) == spec


def test_calibrate_with_a_glob_that_matches_nothing_says_so():
    spec = sparsecc.load_spec({"version": 1, "ffn": [{"modules": "layerz.*", "form": "activation_threshold",
                                                       "sparsity": 0.5}]})
    with pytest.warns(sparsecc.SparseccWarning, match=r"nothing calibrated.*ffn\[0\].*rules that matched "
                                                     r"nothing: ffn\[0\] \(modules='layerz\.\*'\)"):
        assert sparsecc.calibrate(zoo.TwoMlps().eval(), [torch.randn(1, 4, 32)], spec, progress=False) == spec


def test_cli_check_spec(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text('version = 1\n[[attention]]\nform = "streaming"\nsink = 4\nwindow = 16\n')
    assert cli.main(["check-spec", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "streaming(sink=4, window=16)" in out


def test_a_target_sparsity_without_thresholds_is_said_to_need_calibration(tmp_path, capsys):
    """Valid, but every site it decides stays dense: check-spec and the compile's summary both say so."""
    path = tmp_path / "target.toml"
    path.write_text('version = 1\n[[ffn]]\nform = "activation_threshold"\nmode = "gate"\nsparsity = 0.5\n'
                    'policy = "force"\n')
    assert cli.main(["check-spec", str(path)]) == 0
    assert "note: ffn[0] gives a target sparsity but no threshold" in capsys.readouterr().out
    with pytest.warns(sparsecc.SparseccWarning, match=r"ffn\[0\] gives a target sparsity but no threshold: the "
                                                       r"FFN sites it decides stay dense until sparsecc.calibrate"):
        with torch.no_grad():
            sparsecc.compile(zoo.TwoMlps().eval(), spec=str(path), kernels="reference")(torch.randn(1, 4, 32))
    assert [s.applied for s in sparsecc.last_report().sites if s.kind == "ffn"] == [False, False]


def test_calibrate_names_one_tensor_given_as_its_batches():
    spec = {"version": 1, "ffn": [{"form": "activation_threshold", "mode": "gate", "sparsity": 0.5}]}
    with pytest.raises(TypeError, match="calibrate: batches is one Tensor; expected an iterable of batches"):
        sparsecc.calibrate(zoo.TwoMlps().eval(), torch.randn(2, 4, 32), spec, progress=False)


def test_python_dash_m_sparsecc_is_the_command_line():
    result = subprocess.run([sys.executable, "-m", "sparsecc", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "check-spec" in result.stdout, result.stderr


def test_cli_check_spec_reports_errors(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('version = 1\n[[attention]]\nform = "streaming"\nsink = 4\nwindow = -1\n')
    assert cli.main(["check-spec", str(path)]) == cli.EXIT_SPEC_ERROR
    err = capsys.readouterr().err
    assert "bad.toml:5" in err and "attention[0].window" in err


def test_cli_explain_writes_report(tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"version": 1, "ffn": [{"form": "activation_threshold", "threshold": 0.1}]}))
    out = tmp_path / "r.json"
    assert cli.main(["explain", "tests.test_api_cli:build_two_mlps", "--spec", str(spec), "--out", str(out)]) == 0
    assert "ffn" in capsys.readouterr().out
    assert [s["kind"] for s in json.loads(out.read_text())["sites"]].count("ffn") == 2


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "sparsecc.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "check-spec" in result.stdout


IMPORT_DATA = str(Path(__file__).parent / "data" / "importers")


def test_cli_import_writes_a_loadable_spec(tmp_path, capsys):
    from sparsecc.importers import import_duo_attention
    out = tmp_path / "duo.toml"
    argv = ["import", "duo_attention", f"{IMPORT_DATA}/duo", "-o", str(out), "--query-heads", "4",
            "--modules-template", "layers.{layer}", "--sink", "8", "--policy", "force"]
    assert cli.main(argv) == 0
    assert "2 attention, 0 ffn, 0 linear rules" in capsys.readouterr().out
    expected = import_duo_attention(f"{IMPORT_DATA}/duo", query_heads=4, modules_template="layers.{layer}",
                                     sink=8, policy="force")
    assert sparsecc.load_spec(str(out)) == expected
    assert [r.form.sink for r in expected.attention] == [8, 8]


def test_cli_import_compressed_tensors_summary(tmp_path, capsys):
    out = tmp_path / "ct.json"
    assert cli.main(["import", "compressed-tensors", f"{IMPORT_DATA}/ct_two_four.json", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 attention, 0 ffn, 5 linear rules" in printed
    assert "note: the checkpoint stores its sparse weights as sparse-24-bitmask: load the model decompressed" in printed
    assert json.loads(out.read_text())["linear"][0] == {"form": "2:4", "prune": "keep"}  # modules "*" is the default
    stored_dense = tmp_path / "config.json"
    stored_dense.write_text(json.dumps({"sparsity_config": {"format": "dense", "sparsity_structure": "2:4",
                                                            "targets": ["Linear"]}}))
    assert cli.main(["import", "compressed-tensors", str(stored_dense), "-o", str(out)]) == 0
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["import", "compressed_tensors", f"{IMPORT_DATA}/ct_unstructured.json"], "sparsity_structure = 'unstructured'"),
    (["import", "minference", f"{IMPORT_DATA}/minference_streaming.json", "--threshold", "0.4"],
     "--threshold = 0.4 is not allowed; expected only these options for minference: --modules-template, --policy"),
    (["import", "duo_attention", f"{IMPORT_DATA}/duo"], "--query-heads is missing; expected the model's"),
    (["import", "duo_attention", f"{IMPORT_DATA}/duo", "--query-heads", "4", "--threshold", "0.5", "--sparsity", "0.5"],
     "--threshold and --sparsity are both given (--threshold 0.5, --sparsity 0.5); expected at most one of --threshold"),
    (["import", "duo_attention", f"{IMPORT_DATA}/duo", "--query-heads", "4", "--modules-template", "a.b"],
     "--modules-template = 'a.b' is not allowed; expected a module-path glob with one \"{layer}\", e.g. "
     "\"model.layers.{layer}.self_attn\""),
    (["import", "duo_attention", f"{IMPORT_DATA}/duo", "--query-heads", "4", "--model", "tests.zoo:TinyLlama"],
     "--model = 'tests.zoo:TinyLlama' is not allowed; expected only these options for duo_attention: "
     "--query-heads, --threshold, --sparsity, --sink, --recent, --modules-template, --policy"),
    (["import", "h2o", f"{IMPORT_DATA}/duo"], "not an import format"),
])
def test_cli_import_errors(tmp_path, capsys, argv, fragment):
    out = tmp_path / "x.toml"
    assert cli.main(argv + ["-o", str(out)]) == cli.EXIT_SPEC_ERROR
    err = capsys.readouterr().err
    assert fragment in err, err
    assert not out.exists()


def test_cli_import_of_class_name_targets_takes_the_model_from_a_factory(tmp_path, capsys):
    """A compressed-tensors class-name entry needs the model: the error names --model, and --model resolves it."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"quantization_config": {"sparsity_config": {
        "sparsity_structure": "2:4", "targets": ["MyLinear"]}}}))
    out = tmp_path / "ct.toml"
    assert cli.main(["import", "compressed_tensors", str(config), "-o", str(out)]) == cli.EXIT_SPEC_ERROR
    err = capsys.readouterr().err
    assert "is a class name" in err and "pass --model (the model to compile" in err and "model=" not in err, err
    assert not out.exists()
    assert cli.main(["import", "compressed_tensors", str(config), "-o", str(out),
                     "--model", "tests.test_importers_ct:TinyLM"]) == 0
    assert [(r.modules, r.form.name) for r in sparsecc.load_spec(out).linear] == [("layers.1.up_proj", "2:4")]


def test_calibrate_a_model_that_is_itself_the_ffn():
    torch.manual_seed(0)
    model = zoo.PlainGeluFFN().eval()
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "mode": "input", "sparsity": 0.5}]}
    calibrated = sparsecc.calibrate(model, [(torch.randn(2, 8, 32),)], spec, progress=False)
    assert calibrated.ffn[-1].modules == "*" and calibrated.ffn[-1].form.tau("input") > 0
    report = sparsecc.explain(model, torch.randn(2, 8, 32), spec=calibrated)
    assert [s.applied for s in report.sites if s.kind == "ffn"] == [True]


def test_cli_explain_checks_the_report_suffix_before_compiling(tmp_path, capsys):
    """An --out the report cannot be written to stops the command before the factory is even imported."""
    with pytest.raises(SystemExit) as info:
        cli.main(["explain", "no_such_module_anywhere:build", "--out", str(tmp_path / "report.txt")])
    assert info.value.code == 2
    assert "suffix must be one of .json, .md, .html" in capsys.readouterr().err
    assert not (tmp_path / "report.txt").exists()


def test_cli_explain_refuses_an_out_in_a_missing_folder_before_compiling(tmp_path, capsys):
    """As the backend's report= option: a typo in the folder stops the command and creates nothing."""
    out = tmp_path / "no_such_folder" / "r.html"
    with pytest.raises(SystemExit) as info:
        cli.main(["explain", "no_such_module_anywhere:build", "--out", str(out)])
    assert info.value.code == 2
    assert f"cannot be written: the folder {out.parent} does not exist" in capsys.readouterr().err
    assert not out.parent.exists()
    with pytest.raises(sparsecc.SpecError, match="does not exist"):
        sparsecc.compile(torch.nn.Linear(2, 2), report=str(out))
    with pytest.raises(OSError, match="does not exist"):
        sparsecc.Report().save(out)
    assert not out.parent.exists()


@pytest.mark.parametrize("flags, fragment", [(["--seq", "0"], "--seq: 0 is not allowed; expected an integer >= 1"),
                                              (["--batch", "-1"], "--batch: -1 is not allowed")])
def test_cli_explain_checks_its_sizes(capsys, flags, fragment):
    with pytest.raises(SystemExit) as info:
        cli.main(["explain", "examples.quickstart:build_model", *flags])
    assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_cli_explain_names_a_factory_that_returns_no_model(capsys):
    assert cli.main(["explain", "os:getcwd"]) == 2
    assert "os:getcwd() returned str, not an nn.Module" in capsys.readouterr().err


def test_cli_explain_names_a_factory_it_cannot_import():
    with pytest.raises(SystemExit, match="cannot import 'no_such_module_anywhere'"):
        cli.main(["explain", "no_such_module_anywhere:build"])


@pytest.mark.parametrize("flags, fragment", [
    (["--target", "1.5"], "--target: target=1.5 is not allowed"),
    (["--step", "0"], "--step: step=0.0 is not allowed"),
    (["--attention-density", "2"], "--attention-density: attention_density=2.0 is not allowed"),
    (["--attention-block", "0"], "--attention-block: attention_block=0 is not allowed"),
    (["--out-suffix", ".yaml"], "--out: "),
    (["--out-folder", "missing/sub"], "the folder"),
    (["--mode", "gate", "--criterion", "weighted"], "only --criterion magnitude is allowed with --mode gate"),
])
def test_cli_tune_checks_its_arguments_before_loading_anything(tmp_path, capsys, flags, fragment):
    """The model and data named here do not exist: the argument error must come first, before any work."""
    from sparsecc.tune.cli import cli_main

    out = tmp_path / "spec.toml"
    if flags[0] == "--out-suffix":
        out, flags = tmp_path / f"spec{flags[1]}", []
    elif flags[0] == "--out-folder":
        out, flags = tmp_path / flags[1] / "spec.toml", []
    with pytest.raises(SystemExit) as info:
        cli_main(["--model", "no_such_module_anywhere:build", "--data", "no_such_module_anywhere:data",
                  "--out", str(out), *flags])
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_cli_tune_data_errors_name_the_file(tmp_path):
    from sparsecc.tune.cli import cli_main

    base = ["--model", "tests.tune.models:Stack", "--out", str(tmp_path / "spec.toml"), "--no-progress"]
    with pytest.raises(SystemExit, match="no such file"):
        cli_main([*base, "--data", str(tmp_path / "missing.pt")])
    (tmp_path / "notes.txt").write_text("not a torch file")
    with pytest.raises(SystemExit, match="is not a torch.save'd list of batches"):
        cli_main([*base, "--data", str(tmp_path / "notes.txt")])


def test_explain_writes_the_report_it_is_given(tmp_path):
    """explain(report=...) writes the report (it used to reach the model as a keyword argument)."""
    path = tmp_path / "explain.json"
    spec = {"version": 1, "attention": [{"form": "streaming", "sink": 1, "window": 2, "policy": "force"}]}
    report = sparsecc.explain(zoo.SdpaAttention().eval(), torch.randn(1, 8, 32), spec=spec, report=str(path))
    written = json.loads(path.read_text())
    assert [s["module"] for s in written["sites"]] == [s.module for s in report.sites] and report.sites


def test_cudagraphs_on_a_cpu_graph_is_said_to_be_ignored():
    spec = {"version": 1, "linear": [{"form": "2:4", "policy": "force"}]}
    with torch.no_grad():
        sparsecc.compile(zoo.ModuleLinear().eval(), spec=spec, kernels="reference", cudagraphs=True)(torch.randn(3, 32))
    assert any("cudagraphs=True is ignored for a graph on cpu" in n for n in sparsecc.last_report().notes)
