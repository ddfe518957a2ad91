"""Retrieval heads: the few attention heads that read a planted fact back when it is asked for (docs/tune.md).

A ``streaming`` head (sink + recent window) cannot see a fact further back than its window. In decoder LMs, reading
such a fact back runs through a small set of heads: Wu et al. 2024 ("Retrieval Head Mechanistically Explains
Long-Context Factuality") find them by how often a head's attention lands on the needle token being copied;
DuoAttention (Xiao et al. 2024) keeps such heads dense and gives every other head a sink and a recent window.
This module finds them by measurement and builds that split:

* :func:`retrieval_scores`: on needle trials over calibration text (:mod:`sparsecc.tune.needle`), one dense
  forward each; the score of a head is the attention probability it puts on the value's tokens inside the needle
  (``NeedleTrial.value_span``), summed over those tokens and averaged over the rows that predict the answer's
  tokens (positions ``answer_start - 1 .. ctx - 2``) and over the trials. Probabilities are
  ``softmax(q k^T * scaling)`` over the causally visible keys, in float32, from the model's own q and k (after
  its position embedding), as its attention computes them.
* :func:`retrieval_heads`: the fewest top-scoring heads whose scores sum to at least ``coverage`` of all heads'.
* :func:`tune_retrieval`: those heads ``Dense``, every other head ``streaming`` with sink ``sink`` and the widest
  window (a multiple of 16) that keeps the mean block density at most ``budget`` (blocks counted as the KL judge
  counts them, :func:`sparsecc.tune.attention_kl.streaming_block_density`).

The same heads can also be held dense inside the KL judge (``sparsecc.tune.attention_kl.tune_by_kl(...,
dense_heads=...)``, through :func:`sparsecc.tune.attention_kl.hold_dense`), which then chooses the other heads' forms
per layer from its KL table within the budget they leave.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from sparsecc.forms import Dense, Streaming
from sparsecc.tune.attention import DENSITY_BLOCK, HeadChoice
from sparsecc.tune.attention_kl import UNIFORM_SINK, streaming_block_density, uniform_window
from sparsecc.tune.attention_replay import decoder_parts

SCORING_IMPLEMENTATION = "sparsecc_retrieval_score"
"""The transformers attention-implementation name under which the scoring attention is registered."""
DEFAULT_COVERAGE = 0.85
_STATE_ATTR = "_sparsecc_retrieval_state"


@dataclass
class _Scoring:
    """What the scoring attention needs during one trial's forward, and where it adds its scores."""

    scores: torch.Tensor      # [layers, heads] float64, summed over trials
    rows: Tuple[int, int] = (0, 0)
    span: Tuple[int, int] = (0, 0)


def _scoring_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A transformers attention function: SDPA attention, plus the retrieval score of every head of this layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    found = getattr(module, _STATE_ATTR, None)
    if found is not None:
        state, layer = found
        r0, r1 = state.rows
        s0, s1 = state.span
        sk = key.shape[2]
        rep = query.shape[1] // key.shape[1]
        lead = sk - query.shape[2]     # query row i sits at key position i + lead
        if r0 < lead:
            raise ValueError(f"retrieval scoring needs the rows {r0}..{r1 - 1} among this call's queries (positions "
                             f"{lead}..{sk - 1}); score whole sequences without a KV cache")
        q = query[:, :, r0 - lead:r1 - lead].float()
        k = key.float().repeat_interleave(rep, dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        logits = q @ k.transpose(-1, -2) * scale                                # [B, H, R, Sk]
        visible = torch.arange(sk, device=q.device)[None, :] <= torch.arange(r0, r1, device=q.device)[:, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        per_head = probs[..., s0:s1].sum(-1).mean(-1).mean(0)                   # [H]
        state.scores[layer] += per_head.double().cpu()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


@contextlib.contextmanager
def _scoring(model, state: _Scoring):
    from transformers import AttentionInterface

    AttentionInterface.register(SCORING_IMPLEMENTATION, _scoring_attention)
    layers, _, _ = decoder_parts(model)
    config = model.config
    old = config._attn_implementation
    try:
        config._attn_implementation = SCORING_IMPLEMENTATION
        for i, layer in enumerate(layers):
            setattr(layer.self_attn, _STATE_ATTR, (state, i))
        yield
    finally:
        for layer in layers:
            if hasattr(layer.self_attn, _STATE_ATTR):
                delattr(layer.self_attn, _STATE_ATTR)
        config._attn_implementation = old


def retrieval_scores(model, trials: Sequence, *, progress: bool = True) -> torch.Tensor:
    """Retrieval score per (layer, query head) of a transformers decoder LM on needle ``trials`` (module docstring).

    Returns a float64 tensor ``[num_layers, num_heads]``. One dense forward per trial (batch 1, no KV cache).
    ValueError for a trial without a value span (hand-built trials) or no trials.
    """
    from tqdm.auto import tqdm

    if not trials:
        raise ValueError("trials=[] is not allowed; expected needle trials from sparsecc.tune.needle.needle_trials")
    layers, _, _ = decoder_parts(model)
    config = model.config
    for name in ("sliding_window", "attn_logit_softcapping"):
        if getattr(config, name, None) is not None:
            raise ValueError(f"model config {name}={getattr(config, name)!r} is not allowed; retrieval scores assume "
                             "plain causal softmax attention over every earlier key (a Llama-style model)")
    heads = config.num_attention_heads
    state = _Scoring(torch.zeros(len(layers), heads, dtype=torch.float64))
    device = next(model.parameters()).device
    with torch.no_grad(), _scoring(model, state):
        for trial in tqdm(trials, desc="retrieval scores", unit="trial", disable=not progress):
            s0, s1 = trial.value_span
            if not 0 <= s0 < s1 <= trial.answer_start - 1:
                raise ValueError(f"trial value_span={trial.value_span!r} is not allowed; expected the value's tokens "
                                 f"before the answer (answer_start={trial.answer_start}), as needle_trials records "
                                 "them ((0, 0) means the tokenizer split the value differently inside the needle)")
            state.rows = (trial.answer_start - 1, trial.ids.numel() - 1)
            state.span = (s0, s1)
            model(input_ids=trial.ids[None].to(device), use_cache=False)
    return state.scores / len(trials)


def retrieval_heads(scores: torch.Tensor, coverage: float = DEFAULT_COVERAGE) -> List[Tuple[int, int]]:
    """(layer, head) of the fewest top-scoring heads whose scores sum to at least ``coverage`` of the total, best
    first. ``coverage`` 0 gives no head, 1 every head with a positive score."""
    if not 0 <= coverage <= 1:
        raise ValueError(f"coverage={coverage!r} is not allowed; expected a fraction in [0, 1]")
    if scores.dim() != 2 or not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError(f"scores of shape {tuple(scores.shape)} are not allowed; expected finite, non-negative "
                         "[layers, heads] retrieval scores (retrieval_scores)")
    flat = scores.flatten().double()
    total = float(flat.sum())
    if coverage == 0 or total <= 0:
        return []
    order = flat.argsort(descending=True, stable=True)
    taken, acc = [], 0.0
    for i in order.tolist():
        if acc >= coverage * total * (1 - 1e-12) or flat[i] <= 0:
            break
        taken.append(divmod(i, scores.shape[1]))
        acc += float(flat[i])
    return taken


@dataclass
class RetrievalTuning:
    """:func:`tune_retrieval`'s result: ``choices`` for :func:`sparsecc.tune.attention_rules`, the dense ``heads``
    (layer, head), the other heads' ``sink`` and ``window``, the mean block ``density``, and the ``scores``
    ``[layers, heads]`` behind the heads (None from :func:`split_forms` alone)."""

    choices: List[HeadChoice]
    heads: List[Tuple[int, int]]
    sink: int
    window: int
    density: float
    scores: Optional[torch.Tensor] = None


def split_forms(num_layers: int, num_heads: int, dense: Sequence[Tuple[int, int]], ctx: int, budget: float, *,
                sink: int = UNIFORM_SINK, block: int = DENSITY_BLOCK,
                site: str = "model.layers.{}.self_attn") -> RetrievalTuning:
    """``dense`` heads ``Dense``, the rest ``Streaming(sink, W)`` with the widest W (a multiple of 16) whose mean
    block density over all heads is at most ``budget``; ValueError when even W = 16 exceeds it."""
    n = num_layers * num_heads
    dense = list(dict.fromkeys((int(l), int(h)) for l, h in dense))
    for l, h in dense:
        if not (0 <= l < num_layers and 0 <= h < num_heads):
            raise ValueError(f"head (layer {l}, head {h}) is not allowed; the model has {num_layers} layers of "
                             f"{num_heads} heads")
    if not 0 < budget <= 1:
        raise ValueError(f"budget={budget!r} is not allowed; expected a mean block density in (0, 1]")
    if len(dense) == n:
        raise ValueError(f"dense={len(dense)} heads of {n} is not allowed; expected fewer than {n}, so that some "
                         f"heads stream within budget={budget}")
    target = (budget * n - len(dense)) / (n - len(dense))
    window = uniform_window(target, ctx, block, sink)
    stream = Streaming(sink, window)
    d_stream = streaming_block_density(stream, ctx, block)
    if d_stream > target + 1e-12:
        raise ValueError(f"budget={budget} cannot hold {len(dense)} dense heads of {n}: the other heads would need a "
                         f"block density of {max(target, 0):.4f} or less, and streaming sink {sink} window 16 keeps "
                         f"{d_stream:.4f}; raise the budget or lower the coverage")
    keep = set(dense)
    choices = []
    for layer in range(num_layers):
        forms = [Dense() if (layer, h) in keep else stream for h in range(num_heads)]
        choices.append(HeadChoice(site.format(layer), forms, [float("nan")] * num_heads,
                                  [1.0 if isinstance(f, Dense) else d_stream for f in forms]))
    density = (len(dense) + (n - len(dense)) * d_stream) / n
    return RetrievalTuning(choices, dense, sink, window, density)


def tune_retrieval(model, trials: Sequence, budget: float, *, coverage: float = DEFAULT_COVERAGE,
                   sink: int = UNIFORM_SINK, block: int = DENSITY_BLOCK, progress: bool = True) -> RetrievalTuning:
    """Retrieval heads dense, the rest sink + window, at mean block density ``budget`` (module docstring).

    ``trials``: needle trials over calibration text (all of one length, the context the spec is tuned for).
    """
    if not trials:
        raise ValueError("trials=[] is not allowed; expected needle trials from sparsecc.tune.needle.needle_trials")
    ctx = int(trials[0].ids.numel())
    if any(int(t.ids.numel()) != ctx for t in trials):
        raise ValueError("trials must all hold ctx tokens; got lengths "
                         f"{sorted({int(t.ids.numel()) for t in trials})}")
    scores = retrieval_scores(model, trials, progress=progress)
    result = split_forms(scores.shape[0], scores.shape[1], retrieval_heads(scores, coverage), ctx, budget,
                         sink=sink, block=block)
    result.scores = scores
    return result


__all__ = ["DEFAULT_COVERAGE", "RetrievalTuning", "retrieval_heads", "retrieval_scores", "split_forms",
           "tune_retrieval"]
