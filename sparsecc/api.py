"""Public entry points: ``compile``, ``explain`` and ``calibrate``."""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List

import torch

from sparsecc.backend import explain_graph, parse_options, sparsecc_backend
from sparsecc.forms import ActivationThreshold
from sparsecc.report.model import Report
from sparsecc.spec import Rule, Spec, SpecError, load_spec

# |x| samples kept per module per batch for calibration; bounds memory on long sequences.
CALIBRATION_SAMPLES_PER_BATCH = 1 << 20


def compile(model, spec=None, report=None, kernels: str = "auto", cudagraphs: bool = False,
            check_weights: bool = False, fold_epilogues: bool = True, fuse_gate_up: bool = True,
            **torch_compile_kwargs):
    """``torch.compile(model, backend="sparsecc", options=...)``, with the options as arguments.

    ``spec`` is a path (.toml/.json), a dict or a ``Spec``; ``report`` is True
    (print) or a .json/.md/.html path; ``kernels`` is "auto", "triton" or
    "reference"; ``cudagraphs`` replays CUDA graphs (Inductor's cudagraph
    trees, as ``mode="reduce-overhead"`` does for the default backend);
    ``check_weights`` compares a checksum of every compressed weight's
    parameter on every call (see ``refresh``); ``fold_epilogues`` and
    ``fuse_gate_up`` switch off epilogue folding and gate/up fusion of
    block-sparse linears (the report shows both). Other keyword arguments go
    to ``torch.compile``.

    A model with a ``generate`` method (HF transformers) comes back as a
    shallow copy whose ``forward`` is compiled, so ``generate()`` decodes
    through the compiled forward; any other model or function comes back from
    ``torch.compile``.
    """
    options: Dict[str, Any] = {"kernels": kernels}
    if cudagraphs is not False:
        options["cudagraphs"] = cudagraphs   # validated (a bool) by parse_options below
    if check_weights is not False:
        options["check_weights"] = check_weights
    for name, value in (("fold_epilogues", fold_epilogues), ("fuse_gate_up", fuse_gate_up)):
        if value is not True:
            options[name] = value
    if spec is not None:
        options["spec"] = spec
    if report is not None:
        options["report"] = report
    parse_options(options)  # fail now, with a SpecError, rather than at the first call
    if isinstance(model, torch.nn.Module) and callable(getattr(model, "generate", None)):
        return _with_compiled_forward(model, options, torch_compile_kwargs)
    return torch.compile(model, backend=sparsecc_backend, options=options, **torch_compile_kwargs)


def _with_compiled_forward(model: torch.nn.Module, options: Dict[str, Any], torch_compile_kwargs) -> torch.nn.Module:
    """A shallow copy of a generating model (HF ``generate``) whose ``forward`` is the compiled one.

    ``torch.compile(model)`` wraps ``__call__`` only: ``compiled.generate()``
    reaches the original module and runs eagerly. The copy shares every
    parameter, buffer and submodule with ``model`` (nothing is duplicated and
    ``model`` itself is not changed); its own ``forward`` is compiled, so both
    ``copy(ids)`` and ``copy.generate(...)`` run through sparsecc, and site
    paths stay those of ``model.named_modules()``.
    """
    clone = copy.copy(model)
    forward = type(model).forward.__get__(clone)
    clone.forward = torch.compile(forward, backend=sparsecc_backend, options=options, **torch_compile_kwargs)
    return clone


def refresh(model) -> int:
    """Rebuild every compressed or derived weight that compiled graphs hold for ``model``'s parameters.

    Updates through a parameter itself (``p.copy_()``, ``p.mul_()``, an
    optimizer step) are seen on the next call without this. Call it after
    writes that bypass the parameter's version counter, such as
    ``p.data.mul_(2)`` or a write through another view, or compile with
    ``check_weights=True``. ``model`` may be the module or what
    ``sparsecc.compile`` returned. Returns the number of bindings rebuilt.
    """
    from sparsecc.weights import live_bindings

    module = getattr(model, "_orig_mod", model)
    owned = {id(t) for t in list(module.parameters()) + list(module.buffers())}
    count = 0
    for binding in live_bindings():
        if id(binding.param) in owned:
            binding.refresh(binding.param, force=True)
            count += 1
    return count


def explain(model, *example_args, spec=None, kernels: str = "auto", **example_kwargs) -> Report:
    """Capture, match and decide for ``model(*example_args, **example_kwargs)``; run no sparse kernel.

    The model runs once, eagerly, under ``torch.no_grad()`` (as an inference
    compile would). Returns the ``Report`` of every graph Dynamo captured.
    """
    opts = parse_options({"spec": spec, "kernels": kernels})
    sink = Report(kernels=kernels)

    def backend(gm, example_inputs, **_):
        return explain_graph(gm, example_inputs, opts, sink)

    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(*example_args, **example_kwargs)
    return sink


def _glob_escape(path: str) -> str:
    """A glob that matches exactly ``path`` (brackets, * and ? escaped)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in path)


def calibrate(model, batches: Iterable, spec, progress: bool = True) -> Spec:
    """Fill thresholds for ``activation_threshold`` rules that give a target ``sparsity``.

    For each FFN site such a rule covers, tau is the ``sparsity`` quantile of
    |x| over the batches: the FFN input (input mode: shared by gate/up, or
    W1) and the down projection's input, or act(gate) (gate mode). With
    ``criterion = "weighted"`` the quantile is of the score |x_i| * ||W[:, i]||_2
    (the scores of gate and up pooled for the shared input). Returns a
    new Spec with one rule per calibrated site appended (later rules
    override), so the result saves and loads like any spec. Each batch is a
    tuple of positional arguments, a dict of keyword arguments, or a tensor.
    """
    from tqdm.auto import tqdm
    from sparsecc.codegen.activation_sparse import ACTIVATIONS

    spec = load_spec(spec)
    if spec is None:
        raise SpecError("calibrate needs a spec with activation_threshold rules that give a sparsity target")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate needs at least one batch")
    args, kwargs = _split_batch(batches[0])
    report = explain(model, *args, spec=spec, **kwargs)
    modules = dict(model.named_modules())
    # Weight layout per owning module, for the column norms of the weighted criterion.
    in_out = {s.module: s.attrs.get("weight_layout") == "in_out" for s in report.sites if s.kind == "linear"}
    targets = []   # (site record, rule, {projection: module path, tensor role})
    for site in report.sites:
        if site.kind != "ffn":
            continue
        rules = spec.matching("ffn", site.module)
        if not rules or not isinstance(rules[-1].form, ActivationThreshold) or rules[-1].form.sparsity is None:
            continue
        targets.append((site, rules[-1]))
    if not targets:
        return spec
    samples: Dict[tuple, List[torch.Tensor]] = {}
    hooks = []
    for site, rule in targets:
        form = rule.form
        linears = site.attrs.get("linear_modules", "").split(",")
        if form.mode == "input" and getattr(form, "criterion", "magnitude") == "weighted":
            for path in linears:   # first, [up,] down: each scores x with its own column norms
                proj = "down" if path == linears[-1] else "input"
                hooks.append(_sample_hook(modules, path, (site.module, proj), samples, use_output=False,
                                          weighted_in_out=in_out.get(path, False)))
        elif form.mode == "input":
            first, down = linears[0], linears[-1]
            hooks.append(_sample_hook(modules, first, (site.module, "input"), samples, use_output=False))
            hooks.append(_sample_hook(modules, down, (site.module, "down"), samples, use_output=False))
        else:
            act = ACTIVATIONS.get(site.attrs.get("activation"))
            if act is None:
                continue
            hooks.append(_sample_hook(modules, linears[0], (site.module, "gate"), samples, use_output=True,
                                      transform=act, half=site.attrs.get("gate_half")))
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="sparsecc calibrate", disable=not progress):
                a, k = _split_batch(batch)
                model(*a, **k)
    finally:
        for h in hooks:
            h.remove()
    new_rules = list(spec.ffn)
    for site, rule in targets:
        form = rule.form
        taus = {}
        for proj in ("input", "down", "gate"):
            chunks = samples.get((site.module, proj))
            if chunks:
                values = torch.cat(chunks).float()
                k = max(1, min(values.numel(), int(round(form.sparsity * values.numel()))))
                taus[proj] = float(values.kthvalue(k).values)
        if not taus:
            continue
        extra = {"criterion": form.criterion} if hasattr(form, "criterion") else {}
        calibrated = ActivationThreshold(mode=form.mode, thresholds=tuple(sorted(taus.items())),
                                         sparsity=form.sparsity, **extra)
        # A model that is itself the FFN has the empty module path, which no glob spells; "*" matches it
        # (and, the root being the only FFN such a model has, nothing else).
        modules = _glob_escape(site.module) if site.module else "*"
        new_rules.append(Rule(kind="ffn", index=len(new_rules), form=calibrated, modules=modules,
                              policy=rule.policy))
    return spec.with_rules("ffn", new_rules)


def _split_batch(batch):
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _sample_hook(modules, path, key, samples, use_output, transform=None, half=None, weighted_in_out=None):
    module = modules.get(path)
    if not isinstance(module, torch.nn.Module) or not hasattr(module, "weight"):
        raise ValueError(f"calibrate: the FFN projection owned by {path!r} is not a Linear-like module, "
                         "so its input cannot be hooked")
    norms = None
    if weighted_in_out is not None:
        from sparsecc.passes.ffn import column_norms
        norms = column_norms(module.weight, weighted_in_out)

    def record(tensor):
        x = tensor.detach()
        if half is not None:
            x = x.chunk(2, dim=-1)[half]
        if transform is not None:
            x = transform(x.double())
        if norms is not None:   # the weighted score, in float32 as the op computes it
            x = x.abs().float() * norms.to(x.device)
        flat = x.abs().flatten().float()
        if flat.numel() > CALIBRATION_SAMPLES_PER_BATCH:
            stride = flat.numel() // CALIBRATION_SAMPLES_PER_BATCH
            flat = flat[::stride]
        samples.setdefault(key, []).append(flat.cpu())

    if use_output:
        return module.register_forward_hook(lambda mod, inp, out: record(out))
    return module.register_forward_pre_hook(lambda mod, inp: record(inp[0]))
