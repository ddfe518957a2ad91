"""Public entry points: ``compile``, ``explain`` and ``calibrate``."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import sys
import types
import weakref
from typing import Any, Dict, Iterable

import torch

from sparsecc.backend import (begin_compile, explain_graph, first_call_check, forget_compile, parse_options,
                              sparsecc_backend)
from sparsecc.forms import ActivationThreshold
from sparsecc.report.model import Report
from sparsecc.sharding import is_dtensor
from sparsecc.spec import Rule, Spec, SpecError, load_spec


def compile(model, spec=None, report=None, kernels: str = "auto", cudagraphs: bool = False,
            check_weights: bool = False, fold_epilogues: bool = True, fuse_gate_up: bool = True,
            cpp_wrapper: bool = False, **torch_compile_kwargs):
    """``torch.compile(model, backend="sparsecc", options=...)``, with the options as arguments.

    ``spec`` is a path (.toml/.json), a dict or a ``Spec``; ``report`` is True
    (print) or a .json/.md/.html path; ``kernels`` is "auto", "triton" or
    "reference"; ``cudagraphs`` replays CUDA graphs (Inductor's cudagraph
    trees, as ``mode="reduce-overhead"`` does for the default backend);
    ``check_weights`` compares a checksum of every compressed weight's
    parameter on every call (see ``refresh``); ``fold_epilogues`` and
    ``fuse_gate_up`` switch off epilogue folding and gate/up fusion of
    block-sparse linears (the report shows both); ``cpp_wrapper`` lowers with
    Inductor's C++ wrapper. Other keyword arguments go to ``torch.compile``.

    A model with a ``generate`` method (HF transformers) comes back as a
    shallow copy whose ``forward`` is compiled, so ``generate()`` decodes
    through the compiled forward; any other model or function comes back from
    ``torch.compile``.

    Each call compiles afresh, however often one model class was compiled in
    this process: ``isolate_recompiles=True`` is passed to ``torch.compile``
    where torch has it, so Dynamo's ``recompile_limit`` counts this compile
    alone. ``last_report()`` is this compile's report from now on (empty until
    its graphs compile). After the first call, a ``SparseccWarning`` says so
    if the model ran without sparsecc (Dynamo handed it no graph).
    """
    options: Dict[str, Any] = {"kernels": kernels}
    if cudagraphs is not False:
        options["cudagraphs"] = cudagraphs   # validated (a bool) by parse_options below
    if check_weights is not False:
        options["check_weights"] = check_weights
    if cpp_wrapper is not False:
        options["cpp_wrapper"] = cpp_wrapper   # validated (a bool) by parse_options
    for name, value in (("fold_epilogues", fold_epilogues), ("fuse_gate_up", fuse_gate_up)):
        if value is not True:
            options[name] = value
    if spec is not None:
        options["spec"] = spec
    if report is not None:
        options["report"] = report
    parsed = parse_options(options)  # fail now, with a SpecError, rather than at the first call
    if parsed.spec is not None and isinstance(model, torch.nn.Module):
        _warn_on_rotation_mismatch(model, parsed.spec)
    # Dynamo keeps compiles on the code object, and past config.recompile_limit compiles of one code (one model
    # class; every HF model shares transformers' forward wrapper) it runs that code eagerly: the 9th compile of a
    # class in a process would run the dense model. Each sparsecc.compile gets its own limit.
    torch_compile_kwargs = {**_isolated(), **torch_compile_kwargs}
    # last_report() is this compile's from now on (empty until its graphs reach the backend), never the previous one's
    checked = not torch_compile_kwargs.get("disable", False)
    spec_name = (getattr(parsed.spec, "source", None) or "<inline spec>") if parsed.spec is not None else None
    begin_compile(options, parsed.kernels, check=checked, spec=spec_name)
    if isinstance(model, torch.nn.Module) and callable(getattr(model, "generate", None)):
        return _with_compiled_forward(model, options, torch_compile_kwargs, checked)
    compiled = torch.compile(model, backend=sparsecc_backend, options=options, **torch_compile_kwargs)
    return _with_first_call_check(compiled, options, _code_of(model)) if checked else compiled


@functools.lru_cache(maxsize=None)
def _isolates_recompiles() -> bool:
    """Whether this torch's ``torch.compile`` takes ``isolate_recompiles`` (torch >= 2.13): a compile's
    recompiles then count against its own limit. Asked on first use, not at import."""
    return "isolate_recompiles" in inspect.signature(torch.compile).parameters


def _isolated() -> Dict[str, Any]:
    """The ``torch.compile`` keyword that gives a compile its own recompile limit, where torch has it."""
    return {"isolate_recompiles": True} if _isolates_recompiles() else {}


def _code_of(model) -> Any:
    """The code object Dynamo keeps a compile of ``model`` on (its class's ``forward``, or the function's)."""
    fn = type(model).forward if isinstance(model, torch.nn.Module) else model
    return getattr(fn, "__code__", None)


def _with_first_call_check(compiled, options: Dict[str, Any], code: Any):
    """``compiled`` checking, after its first call, that sparsecc's backend compiled something for ``options``
    (``sparsecc.backend.first_call_check``: a ``SparseccWarning`` when the call ran without sparsecc, e.g. past
    Dynamo's recompile limit). A module gets a forward hook that removes itself; a function a wrapper whose later
    calls cost one flag test."""
    try:
        weakref.finalize(compiled, forget_compile, id(options))
    except TypeError:   # not weak-referenceable: its pending check is dropped at its first call only
        pass
    if isinstance(compiled, torch.nn.Module):
        handle = None

        def hook(module, args, output):
            if not torch.compiler.is_compiling():
                handle.remove()
                first_call_check(options, "the compiled model", code)

        handle = compiled.register_forward_hook(hook)
        return compiled
    pending = [True]

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        out = compiled(*args, **kwargs)
        if pending and not torch.compiler.is_compiling():
            pending.clear()
            first_call_check(options, "the compiled function", code)
        return out

    return call


def _warn_on_rotation_mismatch(model: torch.nn.Module, spec: Spec) -> None:
    """Warn when a tuned spec and the model differ in a transform folded into the model's weights: the residual
    rotation (``sparsecc.tune.rotation``) or the FFN channel scales (``sparsecc.tune.channel_scales``).

    A spec tuned on a transformed model holds thresholds for its transformed FFN inputs (``[meta.tune]
    residual_rotation``, ``ffn_channel_scales``), and one tuned on the plain model thresholds for plain ones: either
    on the other model runs exactly what it says, with thresholds chosen for other activations. Specs without
    ``[meta.tune]`` are not checked.
    """
    import warnings
    from collections.abc import Mapping

    from sparsecc.backend import SparseccWarning
    from sparsecc.tune.channel_scales import FOLDED_TRANSFORMS

    tuned = spec.meta.get("tune")
    if not isinstance(tuned, Mapping) or not tuned:
        return
    for key, what, read, section in FOLDED_TRANSFORMS:
        expected, actual = tuned.get(key), read(model)
        if (expected or None) != actual:
            warnings.warn(SparseccWarning(
                f"sparsecc: the spec was tuned on a model with {what} {expected or 'none'} and this model has "
                f"{actual or 'none'}: its FFN thresholds were chosen for other activations (docs/tune.md, "
                f"'{section}')"), stacklevel=3)


def _with_compiled_forward(model: torch.nn.Module, options: Dict[str, Any], torch_compile_kwargs,
                           checked: bool = True) -> torch.nn.Module:
    """A shallow copy of a generating model (HF ``generate``) whose ``forward`` is the compiled one.

    ``torch.compile(model)`` wraps ``__call__`` only: ``compiled.generate()``
    reaches the original module and runs eagerly. The copy shares every
    parameter, buffer and submodule with ``model`` (nothing is duplicated and
    ``model`` itself is not changed); its own ``forward`` is compiled, so both
    ``copy(ids)`` and ``copy.generate(...)`` run through sparsecc, and site
    paths stay those of ``model.named_modules()``. The compiled function has
    a code object of its own (:func:`_fresh_function`), so Dynamo's recompile
    limit counts this compile alone; after the first call, the copy checks
    that sparsecc compiled it (``first_call_check``) and then calls the
    compiled forward directly.
    """
    clone = copy.copy(model)
    function = _fresh_function(type(model).forward)
    compiled = torch.compile(function.__get__(clone), backend=sparsecc_backend, options=options,
                             **torch_compile_kwargs)
    clone.forward = compiled
    if not checked:
        return clone
    weakref.finalize(clone, forget_compile, id(options))

    @functools.wraps(compiled)
    def first_call(*args, **kwargs):
        out = compiled(*args, **kwargs)
        if not torch.compiler.is_compiling():
            clone.forward = compiled   # later calls go straight to the compiled forward
            first_call_check(options, "the compiled model's forward", getattr(function, "__code__", None))
        return out

    clone.forward = first_call
    return clone


def _fresh_function(fn):
    """``fn`` with a code object of its own (same code, globals, defaults, closure and attributes).

    Dynamo keeps compiles on the code object and stops compiling one after ``config.recompile_limit`` entries;
    every compile of one model class (and of every HF model: transformers wraps all their forwards in one
    decorator function) would share one. A fresh code object per compile gives each its own cache and limit.
    Anything but a plain function is returned as it is.
    """
    if not isinstance(fn, types.FunctionType):
        return fn
    fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    fresh.__kwdefaults__ = copy.copy(fn.__kwdefaults__)
    fresh.__dict__.update(fn.__dict__)
    for name in ("__qualname__", "__module__", "__doc__", "__annotations__"):
        setattr(fresh, name, getattr(fn, name))
    return fresh


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
    # The model's own parameter order, then the order the bindings were made: the same on every tensor-parallel
    # rank, whose rebuilds gather the whole weight (a collective) one binding at a time.
    order = {id(t): i for i, t in enumerate(list(module.parameters()) + list(module.buffers()))}
    mine = [(order[id(b.param)], n, b) for n, b in enumerate(live_bindings()) if id(b.param) in order]
    for _, _, binding in sorted(mine, key=lambda item: item[:2]):
        binding.refresh(binding.param, force=True)
    return len(mine)


def explain(model, *example_args, spec=None, kernels: str = "auto", report=None, **example_kwargs) -> Report:
    """Capture, match and decide for ``model(*example_args, **example_kwargs)``; run no sparse kernel.

    The model runs once, eagerly, under ``torch.no_grad()`` (as an inference
    compile would). Returns the ``Report`` of every graph Dynamo captured;
    ``report`` (a .json/.md/.html path, as ``compile``'s) also writes it there.
    """
    opts = parse_options({"spec": spec, "kernels": kernels, **({"report": report} if report is not None else {})})
    sink = Report(kernels=kernels)

    def backend(gm, example_inputs, **_):
        return explain_graph(gm, example_inputs, opts, sink)

    # its own recompile limit, as sparsecc.compile's: an explain never uses up the compiles of the model's class
    compiled = torch.compile(model, backend=backend, **_isolated())
    with torch.no_grad(), _floats_specialised():
        compiled(*example_args, **example_kwargs)
    if isinstance(opts.report, str):
        sink.save(opts.report)
    elif opts.report is True:
        print(str(sink), file=sys.stderr)
    return sink


def _floats_specialised():
    """Dynamo fixing every Python float it traces, as a compile ends up doing.

    A float attribute that changed since an earlier compile of the same code (two models in one process) is
    otherwise traced as a graph value; Inductor's lowering has Dynamo retrace it as a constant, which an
    explain never reaches, so its report would describe a graph no compile runs.
    """
    config = torch._dynamo.config
    return config.patch(specialize_float=True) if hasattr(config, "specialize_float") else contextlib.nullcontext()


def calibrate(model, batches: Iterable, spec, progress: bool = True) -> Spec:
    """Fill thresholds for ``activation_threshold`` rules that give a target ``sparsity``.

    For each FFN site such a rule decides, tau is the ``sparsity`` quantile of
    |x| over the batches: the FFN input (input mode: shared by gate/up, or
    W1) and the down projection's input, or act(gate) (gate mode). With
    ``criterion = "weighted"`` the quantile is of the score |x_i| * ||W[:, i]||_2
    (the scores of gate and up pooled for the shared input). The scores are
    those ``sparsecc.tune`` measures (``sparsecc.tune.capture.score_samples``),
    so both give one threshold for one target. They are measured on the dense
    model: the down projection's input is scored without the FFN input
    thresholded upstream, so in the compiled model somewhat more than the target
    of it falls below its threshold (docs/spec.md). A rule's given thresholds are
    replaced. Returns a new Spec with one rule
    per calibrated site appended (later rules override), so the result saves
    and loads like any spec. Each batch is a tuple of positional arguments, a
    dict of keyword arguments, or a tensor.
    """
    from tqdm.auto import tqdm
    from sparsecc.tune.capture import (linear_layouts, quantile_tau, score_samples, site_projections,
                                       split_batch)
    from sparsecc.tune.tuner import glob_escape

    spec = load_spec(spec)
    if spec is None:
        raise SpecError("calibrate needs a spec with activation_threshold rules that give a sparsity target")
    sharded = next((name for name, p in model.named_parameters() if is_dtensor(p)), None)
    if sharded is not None:
        # A quantile over one rank's shard is not the quantile over the whole activation: the ranks would get
        # different thresholds, and none of them the unsharded model's.
        raise ValueError(f"calibrate: {sharded} is a DTensor (tensor parallelism); thresholds are quantiles over "
                         "whole activations, so calibrate the unsharded model (before parallelize_module) and "
                         "compile the parallel model with the returned spec (docs/distributed.md)")
    if isinstance(batches, (torch.Tensor, dict)):
        # Iterating one tensor would feed its rows, one dimension short, as batches of their own.
        raise TypeError(f"calibrate: batches is one {type(batches).__name__}; expected an iterable of batches "
                        "(e.g. [input_ids] or a DataLoader), each a tuple of positional arguments, a dict of "
                        "keyword arguments, or a tensor")
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate needs at least one batch")
    args, kwargs = split_batch(batches[0])
    report = explain(model, *args, spec=spec, **kwargs)
    modules = dict(model.named_modules())
    layout = linear_layouts(report)
    targets = []   # (site module, its rule, its projections)
    for site in report.sites:
        if site.kind != "ffn" or any(site.module == t[0] for t in targets):
            continue
        rule = spec.resolve("ffn", site.module)
        if rule is None or not isinstance(rule.form, ActivationThreshold) or rule.form.sparsity is None:
            continue
        try:
            projections = site_projections(site, modules, layout, rule.form.mode)
        except ValueError as e:
            raise ValueError(f"calibrate: {e}") from None
        targets.append((site.module, rule, projections))
    criteria = {p: rule.form.criterion for _, rule, projections in targets for p in projections}
    if not criteria:
        # Nothing to calibrate is the caller's mistake more often than not (a glob with a typo, a rule without a
        # target): said, with what the spec's FFN rules matched, rather than returning the spec silently.
        import warnings

        from sparsecc.backend import SparseccWarning
        targeted = [r.key for r in spec.ffn if isinstance(r.form, ActivationThreshold) and r.form.sparsity is not None]
        unmatched = report.unmatched_rules()
        warnings.warn(SparseccWarning(
            "sparsecc.calibrate: nothing calibrated, the spec comes back unchanged: "
            + ("no activation_threshold rule gives a sparsity target" if not targeted else
               f"no FFN site is decided by the rules with a sparsity target ({', '.join(targeted)})")
            + (f"; rules that matched nothing: {', '.join(unmatched)}" if unmatched else "")), stacklevel=2)
        return spec
    scores = score_samples(model, tqdm(batches, desc="sparsecc calibrate", disable=not progress), list(criteria),
                           criteria)
    new_rules = list(spec.ffn)
    for path, rule, projections in targets:
        form = rule.form
        taus = {p.key: quantile_tau(scores[p], form.sparsity) for p in projections}
        taus = {key: tau for key, tau in taus.items() if tau is not None}
        if not taus:
            continue
        calibrated = ActivationThreshold(mode=form.mode, thresholds=tuple(sorted(taus.items())),
                                         sparsity=form.sparsity, criterion=form.criterion)
        # A model that is itself the FFN has the empty module path, which no glob spells; "*" matches it
        # (and, the root being the only FFN such a model has, nothing else).
        new_rules.append(Rule(kind="ffn", index=len(new_rules), form=calibrated, modules=glob_escape(path),
                              policy=rule.policy))
    return spec.with_rules("ffn", new_rules)
