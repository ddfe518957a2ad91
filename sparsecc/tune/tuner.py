"""``sparsecc.tune``: FFN thresholds by greedy search, per-head attention forms, a spec with provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sparsecc.forms import ActivationThreshold, Dense
from sparsecc.spec import Defaults, Rule, Spec
from sparsecc.tune import provenance
from sparsecc.tune.attention import DENSITY_BLOCK, HeadChoice, choose_heads, record_attention
from sparsecc.tune.capture import (CRITERIA, ERRORS, MODES, ErrorFn, Projection, ThresholdHooks, ffn_projections,
                                   quantile_tau, relative_error, run, score_samples, split_batch)
from sparsecc.tune.ffn import Allocation, GreedySearch, Sensitivity, separable_allocation, weighted_share
from sparsecc.tune.prefix import LayerPrefix

DEFAULT_STEP = 0.05      # TEAL's greedy raises sparsity in 5% steps
DEFAULT_MAX_LEVEL = 0.95  # no projection is driven past 95%: beyond it single channels carry the output
# The sensitivity grid: every 10% up to 90%, enough to see where each projection's error turns steep.
DEFAULT_SENSITIVITY_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def glob_escape(path: str) -> str:
    """A ``modules`` glob that matches exactly ``path`` ("*" for the root module, which has no path to name)."""
    if not path:
        return "*"
    return "".join(f"[{c}]" if c in "[]*?" else c for c in path)


METHODS = ("greedy", "separable")
# Modes the tuner allocates: one activation_threshold mode everywhere, or "mixed", input or gate mode per site
# (sparsecc.tune.ffn_modes; separable method only).
TUNE_MODES = MODES + ("mixed",)
# Blends of the separable allocation with uniform levels that the separable method also measures: the separable
# model adds single-projection errors, and where they do not add up a step back towards uniform can measure better.
SEPARABLE_BLENDS = (1.0, 0.5, 0.0)
UNIFORM_BLEND = 0.0


@dataclass
class FfnTuning:
    """The outcome of the FFN search: projections, calibration scores and one allocation per target.

    ``search_batches``/``dense`` are the batches the errors were measured on and
    their dense outputs, ``forwards`` the error evaluations spent, ``mode`` the
    activation_threshold mode; ``search`` the greedy search (greedy method),
    ``sensitivity`` the table (separable method), and ``candidates`` per target
    the measured error of every blend tried (separable method). With
    ``mode="mixed"`` the projections are both modes' (the allocation gives the
    unchosen mode of each site level 0), ``sensitivity`` the input-mode table,
    ``gate_sensitivity`` the gate-mode one, and ``candidates`` also holds the
    per-site mode choice's measured error under the key ``"mixed"``.
    """

    projections: List[Projection]
    scores: Dict[Projection, torch.Tensor]
    allocations: List[Allocation]
    criterion: str
    search_batches: List = field(repr=False)
    dense: List = field(repr=False)
    forwards: int = 0
    mode: str = "input"
    method: str = "greedy"
    search: Optional[GreedySearch] = field(default=None, repr=False)
    sensitivity: Optional["FfnSensitivity"] = field(default=None, repr=False)
    candidates: Dict[float, Dict[object, float]] = field(default_factory=dict)
    gate_sensitivity: Optional["FfnSensitivity"] = field(default=None, repr=False)
    modes: Dict[float, Dict[str, str]] = field(default_factory=dict)

    def allocation(self, target: float) -> Allocation:
        """The allocation found for ``target``."""
        for a in self.allocations:
            if abs(a.target - target) < 1e-9:
                return a
        raise KeyError(f"no allocation for target {target}; tuned for {[a.target for a in self.allocations]}")


def error_function(error_fn) -> ErrorFn:
    """``error_fn`` itself, a named one (``"relative"``, ``"kl"``: ``sparsecc.tune.capture.ERRORS``) or the default."""
    if error_fn is None:
        return relative_error
    if isinstance(error_fn, str):
        if error_fn not in ERRORS:
            raise ValueError(f"error_fn={error_fn!r} is not allowed; expected a callable or one of {sorted(ERRORS)}")
        return ERRORS[error_fn]
    return error_fn


def error_name(error_fn) -> str:
    """How ``[meta.tune]`` names an error function."""
    if error_fn is None:
        return "relative_error"
    if isinstance(error_fn, str):
        return ERRORS[error_fn].__name__
    return getattr(error_fn, "__name__", "custom")


def _ffn_setup(model, batches, criterion: str, search_batches, mode: str = "input"):
    """(batches, search batches, FFN projections, sorted calibration scores) with the arguments checked."""
    import sparsecc

    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not allowed; expected one of {CRITERIA}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not allowed; expected one of {MODES}")
    if mode == "gate" and criterion != "magnitude":
        raise ValueError(f"criterion={criterion!r} is defined for mode 'input' only; gate mode compares "
                         "|act(x W_gate)| (criterion 'magnitude')")
    batches = list(batches)
    if not batches:
        raise ValueError("tune needs at least one calibration batch")
    search_batches = batches if search_batches is None else list(search_batches)
    args, kwargs = split_batch(batches[0])
    report = sparsecc.explain(model, *args, **kwargs)
    projections = ffn_projections(model, report, mode)
    if not projections:
        what = "gated FFN site with separate gate and up linears" if mode == "gate" else "FFN site"
        raise ValueError(f"tune: the model has no {what} with Linear-like projections to threshold")
    return batches, search_batches, projections, score_samples(model, batches, projections, criterion)


def tune_ffn(model, batches: Sequence, targets: Sequence[float], *, criterion: str = "magnitude",
             error_fn=None, search_batches: Optional[Sequence] = None, step: float = DEFAULT_STEP,
             max_level: float = DEFAULT_MAX_LEVEL, method: str = "greedy", mode: str = "input",
             levels: Sequence[float] = DEFAULT_SENSITIVITY_LEVELS, progress: bool = True) -> FfnTuning:
    """FFN threshold allocation for each average sparsity in ``targets``.

    ``batches`` set the thresholds' quantiles; ``search_batches`` (default:
    ``batches``) are the ones whose output error is measured; ``error_fn`` a
    callable or a name (``"kl"`` for a causal LM's next-token KL).

    * ``method="greedy"``: the greedy search of :mod:`sparsecc.tune.ffn` (one
      search path, a forward per candidate step).
    * ``method="separable"``: the sensitivity table at ``levels``
      (:func:`ffn_sensitivity`), refined to 5% steps by log-linear
      interpolation (:meth:`Sensitivity.refined`), its separable allocation per target, then
      blends of that allocation with uniform levels (:data:`SEPARABLE_BLENDS`,
      uniform included) measured on the whole model; the best measured one
      wins, so the result never measures worse than uniform on the search batches.

    ``mode="gate"`` allocates gate-mode (CATS) thresholds, one per gated site;
    ``mode="mixed"`` (separable method only) tabulates both modes and chooses
    each site's mode (:mod:`sparsecc.tune.ffn_modes`, :func:`blend_mixed`);
    the target is then the share of every FFN weight skipped.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed; expected one of {METHODS}")
    if mode not in TUNE_MODES:
        raise ValueError(f"mode={mode!r} is not allowed; expected one of {TUNE_MODES}")
    if mode == "mixed":
        if method != "separable":
            raise ValueError("mode='mixed' chooses modes on the sensitivity tables: it needs method='separable'")
        inputs = ffn_sensitivity(model, batches, levels=levels, criterion=criterion, error_fn=error_fn,
                                 search_batches=search_batches, mode="input", progress=progress)
        gates = ffn_sensitivity(model, batches, levels=levels, criterion="magnitude", error_fn=error_fn,
                                search_batches=search_batches, mode="gate", progress=progress)
        return blend_mixed(model, inputs, gates, targets, error_fn, max_level, progress)
    if method == "separable":
        sens = ffn_sensitivity(model, batches, levels=levels, criterion=criterion, error_fn=error_fn,
                               search_batches=search_batches, mode=mode, progress=progress)
        return blend_with_uniform(model, sens, targets, error_fn, max_level, progress)
    from tqdm.auto import tqdm

    error_fn = error_function(error_fn)
    batches, search_batches, projections, scores = _ffn_setup(model, batches, criterion, search_batches, mode)
    dense = [run(model, b) for b in search_batches]
    hooks = ThresholdHooks(model, projections, criterion)
    top = max(targets)
    bar = tqdm(total=100, desc=f"sparsecc tune ffn ({mode}, {criterion})", unit="%", disable=not progress)

    def on_step(average, error, evaluations):
        bar.n = min(100, int(round(100 * average / top)))
        bar.set_postfix(sparsity=f"{average:.3f}", error=f"{error:.2e}", forwards=evaluations)
        bar.refresh()

    search = GreedySearch(model, search_batches, dense, projections, scores, hooks, error_fn,
                          step=step, max_level=max_level, on_step=on_step)
    try:
        with hooks.installed():
            allocations = search.run(sorted(targets))
    finally:
        bar.close()
    return FfnTuning(projections, scores, allocations, criterion, list(search_batches), dense, search.evaluations,
                     mode, "greedy", search=search)


def blend_with_uniform(model, sens: "FfnSensitivity", targets: Sequence[float], error_fn, max_level: float,
             progress: bool) -> FfnTuning:
    """The separable allocations of ``sens`` blended with uniform levels, the best measured blend per target.

    Uniform levels (blend 0) are the fallback: another blend is taken only when its error is no larger than
    uniform's on every search batch, so that a gain that one batch shows and another contradicts (noise of
    the calibration text) never replaces uniform.
    """
    from tqdm.auto import tqdm

    projections, scores = sens.projections, sens.scores
    allocations, candidates = [], {}
    forwards = sens.forwards
    bar = tqdm(total=len(targets) * len(SEPARABLE_BLENDS), desc="sparsecc tune ffn (blends)", disable=not progress)
    try:
        for separable in separable_allocation(sens.sensitivity.refined(), projections, scores, sorted(targets),
                                              max_level):
            tried = _blends(separable, projections, scores)
            best, candidates[separable.target] = _best_measured(model, sens, projections, tried, error_fn, bar)
            forwards += len(tried)
            best.evaluations = forwards
            allocations.append(best)
    finally:
        bar.close()
    return FfnTuning(projections, scores, allocations, sens.criterion, sens.search_batches, sens.dense, forwards,
                     sens.mode, "separable", sensitivity=sens, candidates=candidates)


def blend_mixed(model, inputs: "FfnSensitivity", gates: "FfnSensitivity", targets: Sequence[float], error_fn,
                max_level: float, progress: bool) -> FfnTuning:
    """Per target, the best measured of the per-site mode choice and the input-mode blends with uniform.

    The mode choice is :func:`sparsecc.tune.ffn_modes.mixed_allocations` on the
    refined input-mode and gate-mode tables; it is measured beside the blends of
    :func:`blend_with_uniform` (input mode, uniform input levels the fallback) and
    taken under the same rule: no search batch worse than uniform. Both tables
    must come from the same model, batches and levels.
    """
    from tqdm.auto import tqdm

    from sparsecc.tune.ffn_modes import mixed_allocations

    if inputs.mode != "input" or gates.mode != "gate":
        raise ValueError(f"blend_mixed needs an input-mode and a gate-mode table; got {inputs.mode!r} and {gates.mode!r}")
    projections = list(inputs.projections) + list(gates.projections)
    scores = {**inputs.scores, **gates.scores}
    allocations, candidates, modes = [], {}, {}
    forwards = inputs.forwards + gates.forwards
    refined_in, refined_gate = inputs.sensitivity.refined(), gates.sensitivity.refined()
    choices = mixed_allocations(refined_in, refined_gate, inputs.projections, gates.projections, scores, targets,
                                max_level)
    separable = separable_allocation(refined_in, inputs.projections, inputs.scores, sorted(targets), max_level)
    bar = tqdm(total=len(targets) * (len(SEPARABLE_BLENDS) + 1), desc="sparsecc tune ffn (modes, blends)",
               disable=not progress)
    try:
        for choice, input_only in zip(choices, separable):
            tried = _blends(input_only, projections, scores)
            tried["mixed"] = choice
            best, candidates[choice.target] = _best_measured(model, inputs, projections, tried, error_fn, bar)
            forwards += len(tried)
            best.evaluations = forwards
            if best is not choice:
                best.modes = {p.site: "input" for p in inputs.projections}
            modes[choice.target] = choice.modes
            allocations.append(best)
    finally:
        bar.close()
    return FfnTuning(projections, scores, allocations, inputs.criterion, inputs.search_batches, inputs.dense,
                     forwards, "mixed", "separable", sensitivity=inputs, candidates=candidates,
                     gate_sensitivity=gates, modes=modes)


def _blends(separable: Allocation, projections: Sequence[Projection], scores) -> Dict[object, Allocation]:
    """The blends of ``separable``'s levels with the uniform level of its target (SEPARABLE_BLENDS), unmeasured.

    Projections ``separable`` has no level for (the other mode's, per-site choice) stay at level 0.
    """
    t = separable.target
    out = {}
    for blend in SEPARABLE_BLENDS:
        levels = {p: blend * separable.levels[p] + (1.0 - blend) * t if p in separable.levels else 0.0
                  for p in projections}
        out[blend] = Allocation(t, levels, {p: quantile_tau(scores[p], levels[p]) for p in projections}, 0.0, 0)
    return out


def _best_measured(model, sens: "FfnSensitivity", projections, tried: Dict[object, Allocation], error_fn,
                   bar) -> Tuple[Allocation, Dict[object, float]]:
    """Measure every allocation in ``tried``; the best one no worse than uniform (key 0.0) on any search batch."""
    per_batch: Dict[object, List[float]] = {}
    for key, alloc in tried.items():
        errors: List[float] = []
        alloc.error, _ = measure(model, sens.search_batches, projections, alloc.taus, sens.criterion, error_fn,
                                 sens.dense, per_batch=errors)
        per_batch[key] = errors
        bar.update()
    uniform = per_batch[UNIFORM_BLEND]
    eligible = [key for key, errors in per_batch.items() if all(e <= u for e, u in zip(errors, uniform))]
    best = min(eligible, key=lambda key: tried[key].error)
    return tried[best], {key: alloc.error for key, alloc in tried.items()}


@dataclass
class FfnSensitivity:
    """Per-projection error curves of one model (:func:`ffn_sensitivity`), with what allocations need."""

    projections: List[Projection]
    scores: Dict[Projection, torch.Tensor]
    sensitivity: Sensitivity
    criterion: str
    forwards: int
    mode: str = "input"
    search_batches: List = field(default_factory=list, repr=False)
    dense: List = field(default_factory=list, repr=False)

    def allocations(self, targets: Sequence[float], max_level: float = DEFAULT_MAX_LEVEL) -> List[Allocation]:
        """The separable allocation (:func:`sparsecc.tune.ffn.separable_allocation`) for each target."""
        return separable_allocation(self.sensitivity, self.projections, self.scores, targets, max_level)


def ffn_sensitivity(model, batches: Sequence, *, levels: Sequence[float] = DEFAULT_SENSITIVITY_LEVELS,
                    criterion: str = "magnitude", error_fn=None, search_batches: Optional[Sequence] = None,
                    mode: str = "input", replay: bool = True, progress: bool = True) -> FfnSensitivity:
    """The output error with each FFN projection alone at each sparsity in ``levels`` (the others dense).

    ``batches`` set the quantiles, ``search_batches`` (default: ``batches``)
    are where the error is measured: ``len(projections) * len(levels)`` model
    runs per search batch. The table shows how unevenly sparsity costs across
    layers and projections, i.e. how much any allocation can gain over uniform
    levels, and feeds the separable allocation. ``mode`` "gate" tabulates one
    gate threshold per gated site instead of the input/down pair;
    ``error_fn`` may name an error (``"kl"``: next-token KL for a causal LM).
    With ``replay`` the layers before a projection's layer replay their
    recorded dense outputs (:mod:`sparsecc.tune.prefix`; same numbers, about
    half the compute on a deep stack).
    """
    from tqdm.auto import tqdm

    error_fn = error_function(error_fn)
    batches, search_batches, projections, scores = _ffn_setup(model, batches, criterion, search_batches, mode)
    table = Sensitivity(tuple(levels), {})   # validates the levels before any model run
    model_was_training = model.training
    model.eval()
    errors: Dict[Projection, List[float]] = {p: [] for p in projections}
    bar = tqdm(total=len(projections) * len(table.levels), desc=f"sparsecc ffn sensitivity ({mode}, {criterion})",
               disable=not progress)
    try:
        prefix = LayerPrefix(model, search_batches, [p.site for p in projections] if replay else [])
        hooks = ThresholdHooks(model, projections, criterion)
        with hooks.installed():
            for p in projections:
                first = prefix.layer_of(p.site)
                for level in table.levels:
                    hooks.taus = {p: quantile_tau(scores[p], level)}
                    outs = prefix.run_batches(first)
                    errors[p].append(sum(error_fn(d, o, b) for d, o, b in zip(prefix.dense, outs, search_batches))
                                     / len(search_batches))
                    bar.update()
    finally:
        bar.close()
        model.train(model_was_training)
    table = Sensitivity(table.levels, {p: tuple(row) for p, row in errors.items()})
    return FfnSensitivity(projections, scores, table, criterion, len(projections) * len(table.levels), mode,
                          list(search_batches), prefix.dense)


def measure(model, batches, projections: Sequence[Projection], taus, criterion: str,
            error_fn=None, dense=None, per_batch: Optional[List[float]] = None):
    """(mean error, measured sparsity per projection) of ``model`` with ``taus`` applied on ``batches``.

    ``per_batch``, when given a list, receives each batch's error in order.
    """
    error_fn = error_function(error_fn)
    dense = dense if dense is not None else [run(model, b) for b in batches]
    hooks = ThresholdHooks(model, projections, criterion, taus=dict(taus), counting=True)
    errors = []
    with hooks.installed():
        for batch, d in zip(batches, dense):
            errors.append(float(error_fn(d, run(model, batch), batch)))
    if per_batch is not None:
        per_batch.extend(errors)
    sparsity = {p: 1.0 - kept / max(1, seen) for p, (kept, seen) in hooks.counts.items()}
    return sum(errors) / len(batches), sparsity


def ffn_rules(projections: Sequence[Projection], taus, criterion: str) -> List[Rule]:
    """One ``activation_threshold`` rule per FFN site with a threshold (projections without one stay dense)."""
    by_site: Dict[Tuple[str, str], Dict[str, float]] = {}
    for p in projections:
        if taus.get(p) is not None:
            by_site.setdefault((p.site, p.mode), {})[p.key] = float(taus[p])
    sites = [site for site, _ in by_site]
    both = sorted({site for site in sites if sites.count(site) > 1})
    if both:
        # One activation_threshold rule applies per site: thresholds of both modes cannot both run.
        raise ValueError(f"ffn_rules: sites {both} have thresholds in both input and gate mode; give each site "
                         "one mode (the other mode's taus None)")
    rules = []
    for (site, mode), table in by_site.items():
        # Gate mode compares |act(gate)| only: its criterion is always magnitude.
        form = ActivationThreshold(mode=mode, thresholds=tuple(sorted(table.items())),
                                   criterion=criterion if mode == "input" else "magnitude")
        rules.append(Rule(kind="ffn", index=len(rules), form=form, modules=glob_escape(site)))
    return rules


def attention_rules(choices: Sequence[HeadChoice]) -> List[Rule]:
    """Per-site rules naming the heads of each chosen sparse form (dense heads get no rule)."""
    rules = []
    for choice in choices:
        groups: Dict[object, List[int]] = {}
        for h, form in enumerate(choice.forms):
            if not isinstance(form, Dense):
                groups.setdefault(form, []).append(h)
        for form, heads in groups.items():
            full = len(heads) == len(choice.forms)
            rules.append(Rule(kind="attention", index=len(rules), form=form, modules=glob_escape(choice.site),
                              heads=None if full else tuple(heads)))
    return rules


class TuneArgumentError(ValueError):
    """An argument of :func:`tune` that is not allowed; ``argument`` is its name."""

    def __init__(self, argument: str, value, allowed: str):
        super().__init__(f"{argument}={value!r} is not allowed; expected {allowed}")
        self.argument = argument


def check_tune_arguments(*, target: float, step: float, attention_density: Optional[float], attention_block: int,
                         out=None) -> None:
    """Raise :class:`TuneArgumentError` (SpecError for ``out``) naming the first argument of :func:`tune` that is
    not allowed.

    :func:`tune` calls it before any work, and ``sparsecc tune`` before it loads the model, so a bad argument never
    costs a calibration run.
    """
    from sparsecc.spec.writer import check_spec_path

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not (number(target) and 0 < target < 1):
        raise TuneArgumentError("target", target, "an average FFN sparsity in (0, 1)")
    if not (number(step) and 0 < step < 1):
        raise TuneArgumentError("step", step, "a number in (0, 1)")
    if attention_density is not None and not (number(attention_density) and 0 < attention_density <= 1):
        raise TuneArgumentError("attention_density", attention_density, "a mean density in (0, 1]")
    if not (isinstance(attention_block, int) and not isinstance(attention_block, bool) and attention_block >= 1):
        raise TuneArgumentError("attention_block", attention_block, "an integer >= 1")
    if out is not None:
        check_spec_path(out)


def tune(model, batches, target: float = 0.5, out=None, *, criterion: str = "magnitude",
         error_fn=None, search_batches: Optional[Sequence] = None,
         step: float = DEFAULT_STEP, max_level: float = DEFAULT_MAX_LEVEL, method: str = "greedy",
         mode: str = "input", levels: Sequence[float] = DEFAULT_SENSITIVITY_LEVELS,
         attention_density: Optional[float] = None, attention_candidates: Optional[Sequence] = None,
         attention_block: int = DENSITY_BLOCK, policy: str = "auto", progress: bool = True) -> Spec:
    """Tune a spec for ``model`` on calibration ``batches``; save it to ``out`` (.toml/.json) when given.

    * FFN: thresholds per layer and projection at average sparsity ``target``
      (:func:`tune_ffn`): ``method`` "greedy" (the search of
      :mod:`sparsecc.tune.ffn`) or "separable" (sensitivity table at
      ``levels``, separable allocation, best measured blend with uniform);
      ``mode`` "input" (TEAL; ``criterion`` "magnitude" or "weighted"),
      "gate" (CATS, one threshold per gated site) or "mixed" (either per
      site, chosen on both modes' tables; separable method; ``criterion``
      applies to the input-mode sites); ``error_fn(dense_out,
      sparse_out, batch)`` or a name (``"kl"``: next-token KL of a causal LM)
      is the output error it minimises (default: relative squared error of
      the first output tensor).
    * Attention (when ``attention_density`` is given): one form per head among
      dense and the candidates (default grid: streaming, block_topk,
      vertical_slash) by recalled attention mass, mean density at most
      ``attention_density`` (:mod:`sparsecc.tune.attention`), density counted in
      blocks of ``attention_block`` x ``attention_block`` (1: entries).
    * ``[meta.tune]`` records the provenance and what was achieved per layer.

    Each batch is a tuple of positional arguments, a dict of keyword arguments
    or a tensor. Returns the Spec (with ``defaults.policy = policy``).
    """
    from tqdm.auto import tqdm

    batches = list(batches)
    check_tune_arguments(target=target, step=step, attention_density=attention_density,
                         attention_block=attention_block, out=out)
    model_was_training = model.training
    model.eval()
    try:
        ffn = tune_ffn(model, batches, [target], criterion=criterion, error_fn=error_fn,
                       search_batches=search_batches, step=step, max_level=max_level, method=method, mode=mode,
                       levels=levels, progress=progress)
        alloc = ffn.allocation(target)
        searched = ffn.search_batches
        error, measured = measure(model, searched, ffn.projections, alloc.taus, criterion, error_fn, ffn.dense)
        per_site = []
        for site in dict.fromkeys(p.site for p in ffn.projections):
            mine = [p for p in ffn.projections if p.site == site and p.mode == alloc.modes.get(site, p.mode)]
            alone, _ = measure(model, searched, mine, {p: alloc.taus[p] for p in mine}, criterion, error_fn,
                               ffn.dense)
            row = {"module": site, "output_error_alone": provenance.rounded(alone)}
            if mode == "mixed":
                row["mode"] = alloc.modes[site]
            for p in mine:
                row[f"{p.key}_sparsity"] = provenance.rounded(alloc.levels[p])
                row[f"{p.key}_sparsity_measured"] = provenance.rounded(measured.get(p, 0.0))
            per_site.append(row)
        choices: List[HeadChoice] = []
        if attention_density is not None:
            stats = record_attention(model, tqdm(batches, desc="sparsecc tune attention", disable=not progress),
                                     attention_candidates, density_block=attention_block)
            choices = choose_heads(stats, attention_density)
    finally:
        model.train(model_was_training)
    from sparsecc.tune.channel_scales import folded_transforms   # a spec tuned on a transformed model records it
    meta = {
        "model_class": provenance.model_class(model),
        "config_hash": provenance.config_hash(model),
        **folded_transforms(model),
        "date": provenance.utc_now(),
        "versions": provenance.library_versions(),
        "calibration": {"batches": len(batches), "items": provenance.count_items(batches),
                        "hash": provenance.batches_hash(batches), "search_batches": len(searched)},
        "target": {"ffn_sparsity": target},
        "criterion": criterion,
        "search": {"method": method, "mode": mode, "max_level": max_level, "forwards": ffn.forwards,
                   "error": error_name(error_fn),
                   **({"step": step} if method == "greedy" else {"levels": list(levels)})},
        "achieved": {
            "ffn_sparsity": provenance.rounded(alloc.average(ffn.projections)),
            "ffn_sparsity_measured": provenance.rounded(weighted_share(ffn.projections, measured)),
            "output_error": provenance.rounded(error)},
        "ffn": per_site,
    }
    if method == "separable":
        # What each blend of the separable allocation with uniform levels measured (1.0: separable, 0.0: uniform).
        tried = ffn.candidates[alloc.target]
        meta["search"]["blend_errors"] = [[b, provenance.rounded(e)] for b, e in tried.items() if b != "mixed"]
        if mode == "mixed":
            # The per-site mode choice's measured error, and how many sites it gave each mode.
            meta["search"]["mixed_error"] = provenance.rounded(tried["mixed"])
            chosen = list(ffn.modes[alloc.target].values())
            meta["search"]["mixed_modes"] = {m: chosen.count(m) for m in sorted(set(chosen))}
    if attention_density is not None:
        meta["target"]["attention_density"] = attention_density
        meta["target"]["attention_block"] = attention_block
        heads = [(r, d) for c in choices for r, d in zip(c.recall, c.density)]
        if heads:
            meta["achieved"]["attention_recall"] = provenance.rounded(sum(r for r, _ in heads) / len(heads))
            meta["achieved"]["attention_density"] = provenance.rounded(sum(d for _, d in heads) / len(heads))
        meta["attention"] = [{"module": c.site, "recall": provenance.rounded(sum(c.recall) / len(c.recall)),
                              "density": provenance.rounded(sum(c.density) / len(c.density)),
                              "heads": [str(f) for f in c.forms]} for c in choices]
    spec = Spec(defaults=Defaults(policy=policy), attention=tuple(attention_rules(choices)),
                ffn=tuple(ffn_rules(ffn.projections, alloc.taus, criterion)), meta={"tune": meta})
    if out is not None:
        spec.save(out)
    return spec
