"""Needle retrieval: a fact planted at a random depth of a long text, asked for at the end.

A trial is one sequence of exactly ``ctx`` tokens::

    haystack[:cut] + NEEDLE(value) + haystack[cut:] + QUESTION + answer

The haystack is a stretch of the given text starting at a random token; the
needle sentence names a random ``digits``-digit number (the *value*) and sits at
a random depth (a uniform fraction of the haystack, cut at a token boundary);
the answer is the value's tokens. The model *retrieves* the needle when greedy
decoding after the question produces exactly the answer tokens. That is
checked in one forward over the whole sequence: greedy decoding emits the
answer iff, at every answer position, the argmax of the logits one position
before is the answer token (teacher forcing decides nothing the greedy decoder
would not). Trials are drawn from a seeded ``random.Random``, so dense and
sparse runs see the same trials.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

NEEDLE = "\nRemember this: the secret number is {value}.\n"
QUESTION = "\nWhat is the secret number? The secret number is"


@dataclass(frozen=True)
class NeedleTrial:
    """One trial: ``ids`` (1-D, ctx tokens); the answer is ``ids[answer_start:]``; ``depth`` in [0, 1].

    ``value_span`` = (start, end): where the value's tokens sit inside the planted needle (the answer's tokens
    ``" V"``, else the tokens of ``"V"`` alone, found in the needle's tokenisation). (0, 0) when the tokeniser
    splits the value differently inside the needle, and for a trial built by hand;
    :func:`sparsecc.tune.retrieval.retrieval_scores` refuses such trials.
    """

    ids: torch.Tensor
    answer_start: int
    depth: float
    value: str
    value_span: tuple = (0, 0)


@dataclass
class NeedleResult:
    """Per-trial retrieval (True: greedy decoding gives the answer exactly)."""

    hits: List[bool]

    @property
    def rate(self) -> float:
        """The exact-match rate over the trials."""
        return sum(self.hits) / len(self.hits) if self.hits else float("nan")


def needle_trials(tokenizer, text: str, ctx: int, trials: int, *, seed: int = 0, digits: int = 5) -> List[NeedleTrial]:
    """``trials`` needle sequences of exactly ``ctx`` tokens over ``text`` (see the module docstring).

    Raises ValueError when the text is shorter than one haystack or ``ctx``
    cannot hold the needle, the question and the answer.
    """
    from sparsecc.tune.quality import tokenize

    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials={trials!r} is not allowed; expected an integer >= 1")
    if not isinstance(digits, int) or not 1 <= digits <= 18:
        raise ValueError(f"digits={digits!r} is not allowed; expected an integer in [1, 18]")
    hay = tokenize(tokenizer, text)
    question = tokenize(tokenizer, QUESTION)
    rng = random.Random(seed)
    out = []
    for _ in range(trials):
        value = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        needle = tokenize(tokenizer, NEEDLE.format(value=value))
        answer = tokenize(tokenizer, " " + value)
        length = ctx - needle.numel() - question.numel() - answer.numel()
        if length < 1:
            raise ValueError(f"ctx={ctx} cannot hold the needle, question and answer "
                             f"({ctx - length + 1} tokens at least)")
        if hay.numel() < length:
            raise ValueError(f"the text has {hay.numel()} tokens; a haystack of ctx={ctx} needs {length}")
        start = rng.randrange(0, hay.numel() - length + 1)
        depth = rng.random()
        cut = round(depth * length)
        stack = hay[start:start + length]
        ids = torch.cat([stack[:cut], needle, stack[cut:], question, answer])
        span = (0, 0)
        for tokens in (answer, tokenize(tokenizer, value)):
            at = _find(needle, tokens)
            if at >= 0 and tokens.numel():
                span = (cut + at, cut + at + tokens.numel())
                break
        out.append(NeedleTrial(ids, ctx - answer.numel(), cut / length, value, span))
    return out


def _find(haystack: torch.Tensor, tokens: torch.Tensor) -> int:
    """First index where ``tokens`` occurs in ``haystack`` (both 1-D), or -1."""
    n = tokens.numel()
    for i in range(haystack.numel() - n + 1):
        if torch.equal(haystack[i:i + n], tokens):
            return i
    return -1


def retrieved(logits: torch.Tensor, trial: NeedleTrial) -> bool:
    """True when the argmax before every answer position is that answer token (greedy decoding gives the answer)."""
    predicted = logits[trial.answer_start - 1:trial.ids.numel() - 1].argmax(-1).cpu()
    return bool(torch.equal(predicted, trial.ids[trial.answer_start:]))


def needle_check(model, trials: Sequence[NeedleTrial], *, progress: bool = True, desc: str = "needle",
                 on_trial: Optional[Callable[[int, NeedleTrial, bool], None]] = None) -> NeedleResult:
    """Run every trial through ``model`` (batch 1, no KV cache) and record whether it retrieved the needle.

    The progress bar shows the hits so far, so a long run stopped early still tells its partial rate.
    ``on_trial(i, trial, hit)`` runs after each trial (e.g. to check a compile after the first one, or to save
    per-trial results as they come).
    """
    from tqdm.auto import tqdm

    from sparsecc.tune.quality import _device, _logits, model_kwargs

    device = _device(model)
    extra = model_kwargs(model)
    hits = []
    with torch.no_grad():
        bar = tqdm(trials, desc=desc, unit="trial", disable=not progress)
        for i, trial in enumerate(bar):
            logits = _logits(model(input_ids=trial.ids[None].to(device), **extra))[0]
            hits.append(retrieved(logits, trial))
            bar.set_postfix_str(f"hits {sum(hits)}/{len(hits)}")
            if on_trial is not None:
                on_trial(i, trial, hits[-1])
    return NeedleResult(hits)
