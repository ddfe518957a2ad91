"""Calibration plumbing shared by ``sparsecc.calibrate`` and the tuner: batches, FFN projections, score samples,
thresholding hooks, output errors.

The tuner measures the model as it runs eagerly: forward pre-hooks on the
projection modules apply exactly the thresholding the compiled op applies
(``x * (score > tau)``, score ``|x_i|`` or ``|x_i| * ||W[:, i]||_2`` in float32),
so a spec written from these measurements compiles to the same numbers. In
gate mode (CATS) a forward hook on the gate projection keeps the neurons with
``|act(x W_gate)| > tau`` and a pre-hook on the down projection zeroes the
others, which is the gate-sparse FFN's formula.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from sparsecc.passes.ffn import column_norms

CRITERIA = ("magnitude", "weighted")
MODES = ("input", "gate")
# Score samples kept per projection module per batch: bounds memory on long calibration sets (quantiles stay exact
# enough: 2^18 samples put a quantile within ~0.2% of its rank).
SCORE_SAMPLES_PER_BATCH = 1 << 18

# error_fn(dense output, sparse output, batch) -> float; the batch lets it use e.g. an attention mask.
ErrorFn = Callable[[Any, Any, Any], float]


def split_batch(batch) -> Tuple[tuple, dict]:
    """A batch as (args, kwargs): a dict is keyword arguments, a tuple/list positional ones, else one tensor."""
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def run(model, batch):
    """``model`` on one batch, without autograd."""
    args, kwargs = split_batch(batch)
    with torch.no_grad():
        return model(*args, **kwargs)


def first_tensor(output) -> torch.Tensor:
    """The tensor an output error is measured on: the output itself, or its first tensor entry."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output
    if hasattr(output, "to_tuple"):   # transformers ModelOutput: the first field set
        values = output.to_tuple()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"tune: the model output {type(output).__name__} holds no tensor to measure an error on; "
                    "pass error_fn")


def relative_error(dense, sparse, batch=None) -> float:
    """Default output error: ``||y - y_dense||^2 / ||y_dense||^2`` on the first output tensor."""
    d, s = first_tensor(dense).double(), first_tensor(sparse).double()
    return float((s - d).square().sum() / d.square().sum().clamp_min(1e-300))


def next_token_kl(dense, sparse, batch=None) -> float:
    """Mean over positions of KL(p_dense || p_sparse) of the next-token distributions, in nats.

    The first output tensor holds the logits ``[..., vocab]`` (a causal LM's
    ``logits``); every position counts, each distribution softmaxed in float32.
    Perplexity is exp of the mean NLL, and the NLL increase a threshold causes is
    close to this KL on average, so the KL ranks allocations as perplexity does
    without the labels' noise.
    """
    d = torch.log_softmax(first_tensor(dense).float(), dim=-1)
    s = torch.log_softmax(first_tensor(sparse).float(), dim=-1)
    kl = (d.exp() * (d - s)).sum(-1)
    return float(kl.double().mean())


ERRORS = {"relative": relative_error, "kl": next_token_kl}
"""Output errors by the name ``sparsecc tune --error`` uses."""


@dataclass(frozen=True)
class Projection:
    """One threshold the spec can set: the ``input`` or ``down`` key (input mode) or ``gate`` key of an FFN site.

    ``modules`` are the Linear-like modules whose input the threshold applies to
    (first [and up] for ``input``, down for ``down``; for ``gate`` the gate
    projection whose activated output is compared and the down projection whose
    input is masked), ``in_out`` their weight layouts, and ``weight_elements``
    the weights the threshold can skip (for ``gate`` the up and down weights):
    the weight of the average sparsity the tuner targets. ``act`` names the gate
    activation and ``half`` which half of a fused gate_up output is the gate
    (gate mode only; None: the gate projection's whole output).
    """

    site: str
    key: str
    modules: Tuple[str, ...]
    in_out: Tuple[bool, ...]
    weight_elements: int
    act: Optional[str] = None
    half: Optional[int] = None

    @property
    def mode(self) -> str:
        """The ``activation_threshold`` mode this threshold belongs to."""
        return "gate" if self.key == "gate" else "input"

    def __str__(self) -> str:
        return f"{self.site or '<root>'}:{self.key}"


def linear_layouts(report) -> Dict[str, bool]:
    """Per linear site's owner module in ``report``: True when its weight is stored ``[in, out]`` (GPT-2's Conv1D)."""
    return {s.module: s.attrs.get("weight_layout") == "in_out" for s in report.sites if s.kind == "linear"}


def site_projections(site, modules: Dict[str, torch.nn.Module], layout: Dict[str, bool],
                     mode: str = "input") -> List[Projection]:
    """The thresholdable projections of one FFN site (a report's ``SiteRecord``) in ``mode``.

    ``modules`` is the model's ``named_modules()``, ``layout`` its
    ``linear_layouts``. Input mode: ``input`` (the first linear, and up) and
    ``down``. Gate mode: one ``gate`` projection comparing the activated
    output of the gate (W1 of a plain FFN; the gate half of a fused gate_up
    linear) and masking the down projection's input; none when the gate-sparse
    op does not know the activation (the compiled form falls back to dense
    there). A projection whose owner is not a Linear-like module cannot be
    hooked: a ValueError says which.
    """
    from sparsecc.codegen.activation_sparse import ACTIVATIONS

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not allowed; expected one of {MODES}")
    paths = [p for p in str(site.attrs.get("linear_modules", "")).split(",") if p]
    for path in paths:
        if not hasattr(modules.get(path), "weight"):
            raise ValueError(f"the FFN projection owned by {path!r} is not a Linear-like module, "
                             "so its input cannot be hooked")
    if len(paths) < 2:
        raise ValueError(f"the FFN site {site.module!r} names {len(paths)} projection module(s); expected 2 or 3")
    if mode == "gate":
        act = site.attrs.get("activation")
        if act not in ACTIVATIONS:
            return []
        gate, down = paths[0], paths[-1]
        fused = bool(site.attrs.get("fused_gate_up"))
        # the weights the gate can skip: up rows (the up half of a fused weight) and down columns
        skipped = (modules[paths[1]].weight.numel() if len(paths) == 3 else
                   modules[gate].weight.numel() // 2 if fused else 0) + modules[down].weight.numel()
        return [Projection(site.module, "gate", (gate, down), (layout.get(gate, False), layout.get(down, False)),
                           skipped, act=str(act), half=site.attrs.get("gate_half") if fused else None)]
    out = []
    for key, group in (("input", paths[:-1]), ("down", paths[-1:])):
        elements = sum(modules[p].weight.numel() for p in group)
        out.append(Projection(site.module, key, tuple(group), tuple(layout.get(p, False) for p in group), elements))
    return out


def ffn_projections(model, report, mode: str = "input") -> List[Projection]:
    """The tuner's thresholdable projections of every FFN site in ``report`` (an ``explain`` report of ``model``).

    ``mode="input"``: an ``input`` and a ``down`` projection per site.
    ``mode="gate"``: one ``gate`` projection per gated site with separate gate
    and up linears and an activation the gate-sparse op knows. Sites whose
    projections cannot be hooked are left out.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not allowed; expected one of {MODES}")
    modules = dict(model.named_modules())
    layout = linear_layouts(report)
    out = []
    seen = set()
    for site in report.sites:
        if site.kind != "ffn" or site.module in seen:
            continue
        seen.add(site.module)
        paths = [p for p in str(site.attrs.get("linear_modules", "")).split(",") if p]
        if mode == "gate" and (len(paths) != 3 or site.attrs.get("fused_gate_up")):
            continue   # the tuner's gate mode covers gated sites with separate gate and up linears (docs/tune.md)
        try:
            out.extend(site_projections(site, modules, layout, mode))
        except ValueError:
            continue
    return out


@dataclass
class ThresholdHooks:
    """Hooks that threshold the projections' inputs with the taus in ``taus`` (None: dense).

    ``counts`` accumulates (kept, total) entries per projection while ``counting`` is set.
    """

    model: torch.nn.Module
    projections: Sequence[Projection]
    criterion: str = "magnitude"
    taus: Dict[Projection, Optional[float]] = field(default_factory=dict)
    counting: bool = False
    counts: Dict[Projection, List[int]] = field(default_factory=dict)

    @contextlib.contextmanager
    def installed(self) -> Iterator["ThresholdHooks"]:
        """Install the hooks for the duration of the ``with`` block."""
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r} is not allowed; expected one of {CRITERIA}")
        modules = dict(self.model.named_modules())
        handles = []
        try:
            for proj in self.projections:
                if proj.mode == "gate":
                    masks: Dict[str, torch.Tensor] = {}
                    handles.append(modules[proj.modules[0]].register_forward_hook(self._gate_hook(proj, masks)))
                    handles.append(modules[proj.modules[1]].register_forward_pre_hook(self._mask_hook(masks)))
                    continue
                for path, in_out in zip(proj.modules, proj.in_out):
                    module = modules[path]
                    norms = column_norms(module.weight, in_out) if self.criterion == "weighted" else None
                    handles.append(module.register_forward_pre_hook(self._hook(proj, norms)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _count(self, proj: Projection, keep: Optional[torch.Tensor], total: int) -> None:
        c = self.counts.setdefault(proj, [0, 0])
        c[0] += int(keep.sum()) if keep is not None else total
        c[1] += total

    def _hook(self, proj: Projection, norms: Optional[torch.Tensor]):
        def hook(module, args):
            tau = self.taus.get(proj)
            if tau is None and not self.counting:
                return None
            x = args[0]
            keep = keep_mask(x, 0.0 if tau is None else tau, norms)
            if self.counting:
                self._count(proj, keep if tau is not None else None, x.numel())
            if tau is None:
                return None
            return (x * keep.to(x.dtype),) + tuple(args[1:])
        return hook

    def _gate_hook(self, proj: Projection, masks: Dict[str, torch.Tensor]):
        """Forward hook on the gate projection: the neurons whose |act(gate)| passes tau, for the down pre-hook."""
        def hook(module, args, out):
            masks.pop("keep", None)
            tau = self.taus.get(proj)
            if tau is None and not self.counting:
                return None
            keep = gate_scores(proj, out).abs() > (0.0 if tau is None else tau)
            if self.counting:
                self._count(proj, keep if tau is not None else None, keep.numel())
            if tau is not None:
                masks["keep"] = keep
            return None
        return hook

    @staticmethod
    def _mask_hook(masks: Dict[str, torch.Tensor]):
        """Pre-hook on the down projection: zero the neurons the gate hook dropped (act(g) * up * keep)."""
        def hook(module, args):
            keep = masks.pop("keep", None)
            if keep is None:
                return None
            x = args[0]
            return (x * keep.to(x.dtype),) + tuple(args[1:])
        return hook


def gate_scores(proj: Projection, out: torch.Tensor) -> torch.Tensor:
    """``act(gate)`` of a gate projection from its module's output (the gate half of a fused gate_up output), in
    the output's dtype, as the gate-sparse op computes it."""
    from sparsecc.codegen.activation_sparse import ACTIVATIONS

    if proj.half is not None:
        out = out.chunk(2, dim=-1)[proj.half]
    return ACTIVATIONS[proj.act](out)


def keep_mask(x: torch.Tensor, tau: float, norms: Optional[torch.Tensor]) -> torch.Tensor:
    """The kept entries of ``x``: ``|x| > tau`` (magnitude) or ``|x| * norms > tau`` in float32 (weighted).

    These are the comparisons of ``threshold_linear_ref``, so hooks and compiled ops keep the same entries.
    """
    if norms is None:
        return x.abs() > tau
    return (x.abs().float() * norms.to(x.device)) > tau


def score_samples(model, batches, projections: Sequence[Projection],
                  criterion: Union[str, Mapping[Projection, str]]) -> Dict[Projection, torch.Tensor]:
    """Sorted threshold scores per projection over the batches (the dense model), for quantile lookups.

    Input mode: ``|x|`` (or, ``criterion`` "weighted", ``|x_i| * ||W[:, i]||_2``)
    of the projection's inputs; gate mode: ``|act(x W_gate)|``, the gate-sparse
    FFN's comparison. ``criterion`` is one for every projection or one per
    projection. Every batch keeps at most ``SCORE_SAMPLES_PER_BATCH`` scores
    per projection module (evenly strided). This is the one calibration
    measurement: ``sparsecc.calibrate`` and the tuner both take their
    quantiles from it.
    """
    modules = dict(model.named_modules())
    chunks: Dict[Projection, List[torch.Tensor]] = {p: [] for p in projections}
    handles = []

    def keep_samples(proj, score):
        flat = score.flatten()
        if flat.numel() > SCORE_SAMPLES_PER_BATCH:
            flat = flat[:: flat.numel() // SCORE_SAMPLES_PER_BATCH]
        chunks[proj].append(flat.cpu())

    def recorder(proj, norms):
        def hook(module, args):
            x = args[0].detach()
            keep_samples(proj, x.abs().float() if norms is None else x.abs().float() * norms.to(x.device))
        return hook

    def gate_recorder(proj):
        def hook(module, args, out):
            keep_samples(proj, gate_scores(proj, out.detach()).abs().float())
        return hook

    try:
        for proj in projections:
            if proj.mode == "gate":
                handles.append(modules[proj.modules[0]].register_forward_hook(gate_recorder(proj)))
                continue
            weighted = (criterion if isinstance(criterion, str) else criterion[proj]) == "weighted"
            # An input projection's linears (first [and up]) read one x: its magnitudes are sampled once. Weighted
            # scores differ per linear (each its own column norms) and are pooled.
            hooked = zip(proj.modules, proj.in_out) if weighted else [(proj.modules[0], proj.in_out[0])]
            for path, in_out in hooked:
                norms = column_norms(modules[path].weight, in_out) if weighted else None
                handles.append(modules[path].register_forward_pre_hook(recorder(proj, norms)))
        for batch in batches:
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {p: torch.sort(torch.cat(c)).values if c else torch.empty(0) for p, c in chunks.items()}


def quantile_tau(sorted_scores: torch.Tensor, sparsity: float) -> Optional[float]:
    """The tau that zeroes a ``sparsity`` fraction of the scores (None for 0: the projection stays dense).

    The k-th smallest score, k = round(sparsity * n) (``sparsecc.calibrate`` and the tuner alike); None as well
    when there are no scores (the projection never ran).
    """
    n = sorted_scores.numel()
    if sparsity <= 0 or n == 0:
        return None
    k = max(1, min(n, int(round(sparsity * n))))
    return float(sorted_scores[k - 1])
