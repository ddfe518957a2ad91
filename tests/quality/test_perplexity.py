"""Perplexity over token windows (checked against an independent computation), and dense-vs-sparse evaluation."""

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from sparsecc.tune.quality import (NothingRewrittenError, evaluate, perplexity, read_texts, token_windows,  # noqa: E402
                                   tokenize)
from tests.quality import tiny  # noqa: E402

STREAMING = {"version": 1, "defaults": {"policy": "force"},
             "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": 2, "window": 6}]}


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny.build()
    return model, tokenize(tok, tiny.text())


def _by_hand(model, stream, ctx, stride):
    """HF's strided recipe written out: each window predicts its tokens not scored by the window before."""
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, stream.numel() - ctx + 1, stride):
            ids = stream[begin:begin + ctx]
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
            first = max(begin + 1, prev_end)        # absolute index of the first target this window scores
            for t in range(first, begin + ctx):
                nll -= float(logp[t - begin - 1, stream[t]])
                count += 1
            prev_end = begin + ctx
    return math.exp(nll / count), count


@pytest.mark.parametrize("ctx,stride,n", [(64, None, 3), (48, 16, 4)])
def test_perplexity_matches_an_independent_computation(setup, ctx, stride, n):
    model, ids = setup
    windows = token_windows(ids, ctx, n, stride)
    stream = ids[:(n - 1) * (stride or ctx) + ctx]
    expected, count = _by_hand(model, stream, ctx, stride or ctx)
    got = perplexity(model, windows, progress=False)
    assert got.tokens == count == (n * (ctx - 1) if stride is None else ctx - 1 + (n - 1) * stride)
    assert got.value == pytest.approx(expected, rel=1e-9)
    # a random model over a 55-token vocabulary is near the uniform perplexity, not at 1 or far above it
    assert 20 < got.value < 200


def test_windows_skip_and_errors(setup):
    _, ids = setup
    first = token_windows(ids, 100, 2)
    later = token_windows(ids, 100, 1, skip=2)
    assert torch.equal(later[0].ids, ids[200:300]) and torch.equal(first[1].ids, ids[100:200])
    with pytest.raises(ValueError, match=r"the text has 600 tokens: 6 whole windows of ctx=100"):
        token_windows(ids, 100, 7)
    with pytest.raises(ValueError, match=r"ctx=1 is not allowed"):
        token_windows(ids, 1)
    with pytest.raises(ValueError, match=r"stride=200 is not allowed"):
        token_windows(ids, 100, stride=200)


def test_read_texts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*absent.txt' does not exist.*'pydoc'"):
        read_texts([tmp_path / "absent.txt"])
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    assert read_texts([tmp_path / "a.txt", tmp_path / "b.txt"]) == "alpha\n\nbeta"
    assert "assert" in read_texts("pydoc") and len(read_texts("pydoc")) > 100_000


def test_compiled_perplexity_equals_dense_when_the_form_keeps_everything(setup):
    model, ids = setup
    windows = token_windows(ids, 32, 2)
    wide = {**STREAMING, "attention": [{**STREAMING["attention"][0], "sink": 4, "window": 32}]}
    result = evaluate(model, wide, windows, lowering_kind="eager", progress=False)
    assert result.rewritten == {"attention": 2}
    assert result.sparse.value == pytest.approx(result.dense.value, rel=1e-5)


def test_streaming_changes_perplexity_and_reports_sites(setup):
    model, ids = setup
    windows = token_windows(ids, 64, 2)
    result = evaluate(model, STREAMING, windows, lowering_kind="eager", progress=False)
    assert result.rewritten == {"attention": 2} and result.sites["attention"] == 2
    assert result.dense.value == pytest.approx(perplexity(model, windows, progress=False).value, rel=1e-12)
    assert abs(result.relative_change) > 1e-4
    assert "sites rewritten: 2 (attention 2/2" in result.lines()[0]


def test_nothing_rewritten_fails(setup):
    model, ids = setup
    nowhere = {"version": 1, "defaults": {"policy": "force"},
               "attention": [{"modules": "no.such.module", "form": "streaming", "sink": 2, "window": 6}]}
    with pytest.raises(NothingRewrittenError, match=r"rewrote no site.*0/19 sites rewritten"):
        evaluate(model, nowhere, token_windows(ids, 32, 1), lowering_kind="eager", progress=False)


def test_sparsity_targets_are_calibrated_on_the_given_windows(setup):
    model, ids = setup
    spec = {"version": 1, "ffn": [{"modules": "model.layers.*.mlp", "form": "activation_threshold",
                                   "sparsity": 0.4}]}
    windows = token_windows(ids, 64, 2)
    with pytest.raises(ValueError, match="give calibration windows"):
        evaluate(model, spec, windows, force=True, lowering_kind="eager", progress=False)
    result = evaluate(model, spec, windows, force=True, calibration=token_windows(ids, 64, 1, skip=2),
                      lowering_kind="eager", progress=False)
    assert result.rewritten == {"ffn": 2}
    calibrated = [r for r in result.spec.ffn if r.form.thresholds]
    assert len(calibrated) == 2 and result.spec.defaults.policy == "force"


def test_docstrings_text_is_the_standard_library_docstrings_in_module_order():
    import __future__
    import json

    text = read_texts("docstrings")
    # Modules in sorted order: __future__ is the first with a .py file, and its module docstring opens the text.
    assert text.startswith(__future__.__doc__.strip().splitlines()[0])
    assert json.__doc__.strip().splitlines()[0] in text and len(text) > 500_000
    # A missing file is an error that names both shortcuts.
    with pytest.raises(FileNotFoundError, match=r"'pydoc' .*'docstrings'"):
        read_texts([Path("./absent-dir/docstrings")])
