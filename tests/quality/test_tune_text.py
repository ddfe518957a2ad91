"""``sparsecc tune --text``: the tuner's output error and, beside it, dense vs tuned perplexity."""

import re

import pytest
import torch

pytest.importorskip("transformers")

from sparsecc.tune.cli import cli_main  # noqa: E402
from sparsecc.tune.quality import perplexity, token_windows, tokenize  # noqa: E402
from tests.quality import tiny  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny.save(root / "model")
    (root / "text.txt").write_text(tiny.text())
    ids = tokenize(tiny.tokenizer(), tiny.text(words=200, seed=1))
    torch.save([{"input_ids": ids[None, :96], "use_cache": False}], root / "calib.pt")
    return root


def test_tune_reports_perplexity_beside_output_error(saved, tmp_path, capsys):
    out_spec = tmp_path / "tuned.toml"
    rc = cli_main(["--model", str(saved / "model"), "--data", str(saved / "calib.pt"), "--target", "0.4",
                   "--step", "0.2", "--out", str(out_spec), "--no-progress", "--text", str(saved / "text.txt"),
                   "--ctx", "64", "--windows", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "output error" in out and out_spec.exists()
    match = re.search(r"dense ([\d.]+), tuned ([\d.]+) \(([-+\d.]+)%\); sites rewritten: 2 \(.*ffn 2/2", out)
    assert match, out
    model, tok = tiny.build()
    expected = perplexity(model, token_windows(tokenize(tok, tiny.text()), 64, 2), progress=False).value
    assert float(match.group(1)) == pytest.approx(expected, abs=1e-4)
    assert float(match.group(2)) != float(match.group(1))


def test_tune_text_needs_a_tokenizer(saved, tmp_path):
    with pytest.raises(SystemExit, match="--text needs a tokenizer"):
        cli_main(["--model", "tests.quality.tiny:model", "--data", str(saved / "calib.pt"),
                  "--out", str(tmp_path / "t.toml"), "--text", "pydoc"])
    with pytest.raises(SystemExit, match=r"--text: the text has 600 tokens"):
        cli_main(["--model", str(saved / "model"), "--data", str(saved / "calib.pt"),
                  "--out", str(tmp_path / "t.toml"), "--text", str(saved / "text.txt"), "--ctx", "400"])


def test_tune_cli_separable_gate_mode_on_kl(saved, tmp_path, capsys):
    out_spec = tmp_path / "gate.toml"
    rc = cli_main(["--model", str(saved / "model"), "--data", str(saved / "calib.pt"), "--target", "0.5",
                   "--method", "separable", "--mode", "gate", "--error", "kl", "--out", str(out_spec),
                   "--no-progress", "--text", str(saved / "text.txt"), "--ctx", "64", "--windows", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    from sparsecc.spec import load_spec
    spec = load_spec(out_spec)
    assert [r.form.mode for r in spec.ffn] == ["gate", "gate"]
    assert spec.meta["tune"]["search"]["error"] == "next_token_kl"
    assert re.search(r"sites rewritten: 2 \(.*ffn 2/2", out), out
