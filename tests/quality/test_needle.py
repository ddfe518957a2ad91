"""Needle retrieval trials: their layout, the greedy exact-match check, and ``sparsecc eval --needle``."""

import re

import pytest
import torch

from sparsecc.tune.needle import NEEDLE, QUESTION, NeedleTrial, needle_check, needle_trials, retrieved

VOCAB = 128


class CharTokenizer:
    """One token per character (code point mod 128): enough to see where every piece of a trial landed."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def _text(n=3000):
    return "".join("abcdefghij klmnopqrstuvwxyz,.\n"[(i * 7) % 30] for i in range(n))


def _encode(text):
    return torch.tensor(CharTokenizer()(text)["input_ids"])


def test_trials_hold_needle_question_and_answer_at_exact_length():
    trials = needle_trials(CharTokenizer(), _text(), ctx=400, trials=20, seed=3)
    depths = []
    for t in trials:
        assert t.ids.numel() == 400 and len(t.value) == 5
        answer = _encode(" " + t.value)
        question = _encode(QUESTION)
        assert torch.equal(t.ids[t.answer_start:], answer)
        assert torch.equal(t.ids[t.answer_start - question.numel():t.answer_start], question)
        needle = _encode(NEEDLE.format(value=t.value))
        text = "".join(chr(int(i)) for i in t.ids)
        at = text.index(NEEDLE.format(value=t.value))
        hay = 400 - needle.numel() - question.numel() - answer.numel()
        assert at == round(t.depth * hay)
        start, end = t.value_span   # the value's tokens inside the planted needle
        assert at <= start < end <= at + needle.numel() and torch.equal(t.ids[start:end], answer)
        depths.append(t.depth)
    assert min(depths) < 0.25 and max(depths) > 0.75          # depths spread over the haystack
    again = needle_trials(CharTokenizer(), _text(), ctx=400, trials=20, seed=3)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(trials, again))      # seeded: dense and sparse see the same
    other = needle_trials(CharTokenizer(), _text(), ctx=400, trials=20, seed=4)
    assert not all(torch.equal(a.ids, b.ids) for a, b in zip(trials, other))


def test_retrieved_is_greedy_exact_match():
    trial = NeedleTrial(torch.tensor([5, 6, 7, 8, 9]), answer_start=3, depth=0.0, value="")
    logits = torch.full((5, 16), -1.0)
    logits[2, 8] = 1.0          # predicts the first answer token from position 2
    logits[3, 9] = 1.0          # and the second from position 3
    assert retrieved(logits, trial)
    logits[3, 9], logits[3, 4] = -1.0, 1.0
    assert not retrieved(logits, trial)     # one wrong answer token is a miss


class _Peek(torch.nn.Module):
    """Logits that put the next true token first (a perfect model), or the current one (``copy``: always wrong)."""

    def __init__(self, copy=False):
        super().__init__()
        self.copy = copy
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        target = input_ids if self.copy else torch.roll(input_ids, -1, dims=-1)
        return torch.nn.functional.one_hot(target, VOCAB).float()


def test_needle_check_counts_hits_and_misses():
    trials = needle_trials(CharTokenizer(), _text(), ctx=300, trials=6, seed=0)
    assert needle_check(_Peek(), trials, progress=False).rate == 1.0
    assert needle_check(_Peek(copy=True), trials, progress=False).rate == 0.0


def test_needle_progress_shows_the_hits_so_far(capsys):
    """A stopped run's log still tells its partial rate: the bar shows hits / trials done."""
    trials = needle_trials(CharTokenizer(), _text(), ctx=300, trials=3, seed=0)
    needle_check(_Peek(), trials, progress=True)
    assert "hits 3/3" in capsys.readouterr().err


def test_needle_trials_reject_bad_arguments():
    with pytest.raises(ValueError, match="trials=0"):
        needle_trials(CharTokenizer(), _text(), ctx=300, trials=0)
    with pytest.raises(ValueError, match="cannot hold"):
        needle_trials(CharTokenizer(), _text(), ctx=40, trials=1)
    with pytest.raises(ValueError, match="needs"):
        needle_trials(CharTokenizer(), _text(200), ctx=300, trials=1)


def test_eval_cli_prints_needle_rates(tmp_path, capsys):
    pytest.importorskip("transformers")
    from sparsecc.cli import main
    from tests.quality.test_eval_cli import _spec
    rc = main(["eval", "tests.quality.tiny:build", "--spec", _spec(tmp_path), "--text", "pydoc",
               "--ctx", "96", "--windows", "1", "--needle", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    m = re.search(r"needle exact match: dense (\d+)/3 \(([\d.]+)\), sparse (\d+)/3", out)
    assert m, out


def test_eval_cli_refuses_a_negative_needle_count(tmp_path, capsys):
    pytest.importorskip("transformers")
    from sparsecc.cli import main
    from tests.quality.test_eval_cli import _spec
    rc = main(["eval", "tests.quality.tiny:build", "--spec", _spec(tmp_path), "--text", "pydoc",
               "--ctx", "96", "--windows", "1", "--needle", "-1", "--no-progress"])
    assert rc == 2 and "--needle -1 is not allowed" in capsys.readouterr().err


def test_needle_check_reports_each_trial():
    """``on_trial`` sees every trial in order with its result (a stopped run keeps what it saved)."""
    trials = needle_trials(CharTokenizer(), _text(), ctx=300, trials=4, seed=1)
    seen = []
    result = needle_check(_Peek(copy=True), trials, progress=False,
                          on_trial=lambda i, trial, hit: seen.append((i, trial.depth, hit)))
    assert seen == [(i, t.depth, False) for i, t in enumerate(trials)] and result.hits == [False] * 4
