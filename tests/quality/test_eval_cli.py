"""``sparsecc eval`` on the tiny Llama: both perplexities printed, a loud failure when nothing is rewritten."""

import json
import re

import pytest

pytest.importorskip("transformers")

from sparsecc.cli import main  # noqa: E402
from sparsecc.tune.quality import perplexity, token_windows, tokenize  # noqa: E402
from tests.quality import tiny  # noqa: E402


def _spec(tmp_path, modules="model.layers.*.self_attn", name="spec.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"version": 1, "defaults": {"policy": "force"}, "attention": [
        {"modules": modules, "form": "streaming", "sink": 2, "window": 6}]}))
    return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny.save(root / "model")
    (root / "text.txt").write_text(tiny.text())
    return root


def test_eval_prints_dense_and_sparse_perplexity(saved, tmp_path, capsys):
    rc = main(["eval", str(saved / "model"), "--spec", _spec(tmp_path), "--text", str(saved / "text.txt"),
               "--ctx", "64", "--windows", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "sites rewritten: 2 (attention 2/2" in out
    dense = float(re.search(r"dense perplexity:\s+([\d.]+)", out).group(1))
    sparse = float(re.search(r"sparse perplexity:\s+([\d.]+)", out).group(1))
    change = float(re.search(r"relative change:\s+([-+\d.]+)%", out).group(1))
    model, tok = tiny.build()
    expected = perplexity(model, token_windows(tokenize(tok, tiny.text()), 64, 2), progress=False).value
    assert dense == pytest.approx(expected, abs=1e-4)
    assert sparse != dense and change == pytest.approx(100 * (sparse / dense - 1), abs=0.01)
    assert "over 126 tokens in 2 windows" in out


def test_eval_with_a_factory_and_pydoc_text(tmp_path, capsys):
    rc = main(["eval", "tests.quality.tiny:build", "--spec", _spec(tmp_path), "--text", "pydoc",
               "--ctx", "32", "--windows", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "sparse perplexity:" in out and "1 windows of 32 tokens" in out


def test_eval_fails_when_nothing_is_rewritten(saved, tmp_path, capsys):
    rc = main(["eval", str(saved / "model"), "--spec", _spec(tmp_path, modules="no.such.attn"),
               "--text", str(saved / "text.txt"), "--ctx", "32", "--windows", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "the spec rewrote no site" in err and "0/19 sites rewritten" in err
    assert "no.such.attn" in err     # the report names the rule that matched nothing


def test_eval_bad_inputs_exit_2_with_a_message(saved, tmp_path, capsys):
    spec = _spec(tmp_path)
    assert main(["eval", str(saved / "model"), "--spec", spec, "--text", str(tmp_path / "none.txt")]) == 2
    assert "none.txt' does not exist" in capsys.readouterr().err
    assert main(["eval", str(saved / "model"), "--spec", spec, "--text", str(saved / "text.txt"),
                 "--ctx", "512", "--windows", "2"]) == 2
    assert "the text has 600 tokens: 1 whole windows of ctx=512" in capsys.readouterr().err
    assert main(["eval", "nosuchmodel", "--spec", spec, "--text", "pydoc"]) == 2
    assert "is not a shortcut (smollm2-135m)" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"version": 1, "attention": [{"form": "streaming"}]}')
    assert main(["eval", str(saved / "model"), "--spec", str(tmp_path / "bad.json"), "--text", "pydoc"]) == 2
    assert "spec error" in capsys.readouterr().err
