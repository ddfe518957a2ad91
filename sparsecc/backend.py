"""The ``torch.compile`` backend registered as ``backend="sparsecc"``.

It is found through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="sparsecc", options={...})`` works without
importing sparsecc. Dynamo hands it one FX graph at a time (one per graph
break); each goes through the pipeline in ``sparsecc.pipeline`` and then to
Inductor.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from sparsecc.codegen import ops
from sparsecc.cost import profile_for
from sparsecc.dynamo_notes import code_name, no_graph_reason
from sparsecc.forms import TwoFour
from sparsecc.passes import module_tree
from sparsecc.pipeline import EXPLAIN_STAGES, CompileContext, build_report, run_stages
from sparsecc.report.model import Report
from sparsecc.report.render import REPORT_SUFFIXES, report_suffix, unwritable_reason
from sparsecc.sharding import is_dtensor
from sparsecc.spec import Spec, SpecError, load_spec

log = logging.getLogger("sparsecc")

ALLOWED_OPTIONS = ("spec", "report", "kernels", "cudagraphs", "cpp_wrapper", "check_weights", "fold_epilogues",
                   "fuse_gate_up")
# Options that change the rewritten graph (not only how it runs): the report shows them.
GRAPH_OPTIONS = ("fold_epilogues", "fuse_gate_up")
# SPARSECC_LOWERING=eager runs the rewritten FX graph without Inductor: for debugging a rewrite, and for
# tests that check rewrites numerically many times (Inductor's CPU codegen costs seconds per graph).
LOWERING_ENV = "SPARSECC_LOWERING"
LOWERINGS = ("inductor", "eager")
KERNEL_CHOICES = ops.IMPL_CHOICES

_reports_lock = threading.Lock()
# Rewritten graph modules of this process, newest last (for tests and debugging; cleared by reset_reports).
_graphs: List[Any] = []


@dataclass(frozen=True)
class BackendOptions:
    """Validated backend options."""

    spec: Optional[Spec] = None
    report: Any = None          # None/False, True, or a path ending .json/.md/.html
    kernels: str = "auto"
    cudagraphs: bool = False    # replay CUDA graphs from Inductor's cudagraph trees (decode is launch-bound)
    cpp_wrapper: bool = False   # Inductor's C++ wrapper: the graph's launches run from C++ (less host time)
    check_weights: bool = False  # checksum every bound weight on every call (sees writes through .data)
    fold_epilogues: bool = True  # fold the pointwise chain after a block-sparse linear into its op
    fuse_gate_up: bool = True    # one op for a gated FFN's gate and up projections (needs fold_epilogues)


def parse_options(options: Optional[dict]) -> BackendOptions:
    """Validate ``options=`` of torch.compile; every problem is a SpecError naming the key and allowed values."""
    if options is None:
        return BackendOptions()
    if isinstance(options, BackendOptions):
        return options
    if not isinstance(options, dict):
        raise SpecError("is not allowed", key="options", value=options,
                        allowed=f"a dict with keys {list(ALLOWED_OPTIONS)}")
    unknown = sorted(set(options) - set(ALLOWED_OPTIONS), key=str)
    if unknown:
        raise SpecError("is not a sparsecc option", key=f"options.{unknown[0]}", value=options[unknown[0]],
                        allowed=f"only the keys {list(ALLOWED_OPTIONS)}")
    kernels = options.get("kernels", "auto")
    if kernels not in KERNEL_CHOICES:
        raise SpecError(key="options.kernels", value=kernels, allowed=f"one of {list(KERNEL_CHOICES)}")
    report = options.get("report")
    if not (report is None or isinstance(report, bool)):   # 1 == True and 0 == False, but neither is a switch
        if not (isinstance(report, (str, os.PathLike)) and report_suffix(report)):
            raise SpecError(key="options.report", value=report,
                            allowed=f"True, False, or a path ending in one of {list(REPORT_SUFFIXES)}")
        problem = unwritable_reason(report)
        if problem:
            raise SpecError(f"cannot be written: {problem}", key="options.report", value=report,
                            allowed="a path in an existing, writable folder")
    cudagraphs = options.get("cudagraphs", False)
    if not isinstance(cudagraphs, bool):
        raise SpecError(key="options.cudagraphs", value=cudagraphs, allowed="True or False")
    cpp_wrapper = options.get("cpp_wrapper", False)
    if not isinstance(cpp_wrapper, bool):
        raise SpecError(key="options.cpp_wrapper", value=cpp_wrapper, allowed="True or False")
    check_weights = options.get("check_weights", False)
    if not isinstance(check_weights, bool):
        raise SpecError(key="options.check_weights", value=check_weights, allowed="True or False")
    switches = {}
    for name in GRAPH_OPTIONS:
        value = options.get(name, True)
        if not isinstance(value, bool):
            raise SpecError(key=f"options.{name}", value=value, allowed="True or False")
        switches[name] = value
    return BackendOptions(spec=load_spec(options.get("spec")), report=report, kernels=kernels,
                          cudagraphs=cudagraphs, cpp_wrapper=cpp_wrapper, check_weights=check_weights, **switches)


def _device_of(example_inputs: Sequence) -> torch.device:
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _autograd_active(example_inputs: Sequence) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in example_inputs)


def _lowering() -> str:
    """How rewritten graphs are lowered: "inductor", or "eager" (``SPARSECC_LOWERING``, for debugging)."""
    lowering = os.environ.get(LOWERING_ENV, "inductor")
    if lowering not in LOWERINGS:
        raise SpecError(key=LOWERING_ENV, value=lowering, allowed=f"one of {list(LOWERINGS)}")
    return lowering


def make_context(gm, example_inputs, opts: BackendOptions, replayed: Optional[bool] = None) -> CompileContext:
    """A fresh CompileContext for one graph (the module tree comes from the frame Dynamo is compiling).

    ``replayed`` None: the graph is expected to replay CUDA graphs when ``cudagraphs=True`` allows it on this
    device and lowering; False: decide its sites for plain calls (the graph turned out not to replay)."""
    ops.register_ops()
    device = _device_of(example_inputs)
    if replayed is None:
        # CUDA graphs replay only Inductor's CUDA graphs, and the reference forms (which read tables on the host)
        # turn them off for their graph
        replayed = (opts.cudagraphs and opts.kernels != "reference" and _lowering() == "inductor"
                    and device.type == "cuda")
    return CompileContext(spec=opts.spec, kernels=opts.kernels, autograd=_autograd_active(example_inputs),
                          fold_epilogues=opts.fold_epilogues, fuse_gate_up=opts.fuse_gate_up, replayed=replayed,
                          example_inputs=list(example_inputs), hardware=profile_for(device),
                          modules=module_tree.from_dynamo())


def explain_graph(gm, example_inputs, opts: BackendOptions, sink: Report):
    """Capture, match and decide only; append the graph's report to ``sink`` and run the graph eagerly."""
    ctx = make_context(gm, example_inputs, opts)
    run_stages(_private_copy(gm), ctx, EXPLAIN_STAGES)
    sink.extend(build_report(ctx))
    return gm.forward


def _private_copy(gm):
    """A copy of Dynamo's graph module that the rewrite may change freely.

    Dynamo keeps reading its own graph (its placeholders, its parameter
    sources) after the backend returns, so rewrites never touch it.
    """
    graph = torch.fx.Graph()
    value_map = {}
    out = graph.graph_copy(gm.graph, value_map)
    graph.output(out)
    copy = torch.fx.GraphModule(gm, graph)
    # What Inductor reads of Dynamo's capture: the compile id, the sources of
    # the parameters, and each placeholder's source with its tensor's
    # attributes (``tensor_dict``). From them it learns which inputs are
    # static (parameters, a static KV cache marked by mark_static_address), so
    # CUDA graphs neither copy those on every replay nor refuse a graph that
    # updates a static cache in place.
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    for old, new in value_map.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return copy


def _mark_bound_inputs(gm) -> None:
    """Give the placeholders the rewrite added (bound weights) what Inductor expects of Dynamo's placeholders.

    They have no source in user code, and they are static: the tensors live
    as long as the compile and are refreshed in place.
    """
    if "dynamo_compile_id" not in gm.meta:
        return
    for node in gm.graph.find_nodes(op="placeholder"):
        if not hasattr(node, "_dynamo_source"):
            node._dynamo_source = None
            node.meta["tensor_dict"] = {**node.meta.get("tensor_dict", {}), "_dynamo_static_input_type": "unguarded"}


def compile_graph(gm, example_inputs, opts: BackendOptions, owner: Any = None):
    """Run the full pipeline on one graph and return the compiled callable."""
    from torch._inductor.compile_fx import compile_fx

    captured = gm
    gm = _private_copy(captured)
    ctx = make_context(gm, example_inputs, opts)
    run_stages(gm, ctx)
    if ctx.replayed and _cudagraphs_refusal(opts, ctx) is not None:
        # The sites were decided for CUDA-graph replay (no per-call host floors), which a site of this graph now
        # refuses: decide them again for plain calls, as the graph will run.
        gm = _private_copy(captured)
        ctx = make_context(gm, example_inputs, opts, replayed=False)
        run_stages(gm, ctx)
    _mark_bound_inputs(gm)
    _graphs.append(gm)
    start = time.perf_counter()
    if _lowering() == "inductor":
        cudagraphs = _uses_cudagraphs(opts, ctx)
        if cudagraphs:
            _mark_bound_weights_static(ctx)
        compiled = compile_fx(gm, list(example_inputs) + _static_fakes(ctx.extra_inputs, example_inputs),
                              config_patches=_lowering_config(opts, cudagraphs))
    else:
        compiled = gm.forward
    if ctx.bindings:
        compiled = _with_weights(compiled, ctx, opts.check_weights)
    ctx.stages.append(("lower", (time.perf_counter() - start) * 1e3))
    report = build_report(ctx)
    emit_report(report, opts, owner, ctx.modules.roots[0] if ctx.modules.roots else None)
    return compiled


def _static_fakes(tensors: Sequence[torch.Tensor], example_inputs) -> list:
    """The bound weights as fakes of the graph's fake mode with static sizes, for Inductor's example inputs.

    Handed over as real tensors, AOTAutograd fakifies an input that Dynamo never saw with dynamic sizes (it has
    no symbolic context for it), so every kernel reading a bound weight (a compressed weight, a K-major copy)
    would compile for symbolic sizes. Their sizes are fixed for the life of the compile (a weight update that
    changes them raises, asking for a recompile), so static is what they are. A fake carries its tensor's
    static-address mark (``mark_static_address``, set for cudagraphs=True). Without a fake mode (no tracing
    context) the tensors are passed as they are.
    """
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        return list(tensors)
    fakes = []
    for tensor in tensors:
        fake = fake_mode.from_tensor(tensor, static_shapes=True)
        mark = getattr(tensor, "_dynamo_static_input_type", None)
        if mark is not None:
            fake._dynamo_static_input_type = mark
        fakes.append(fake)
    return fakes


def _uses_cudagraphs(opts: BackendOptions, ctx: CompileContext) -> bool:
    """Whether this graph runs under cudagraph trees: ``options["cudagraphs"]``, unless a sparse site on CUDA
    would allocate and keep tensors on its first call, which a capture forbids (the graph then runs without CUDA
    graphs, with a warning, rather than failing at capture): the reference forms (they read layouts and weight
    tables on the host) and 2:4 sites whose cuSPARSELt operand is not bound at compile time (they compress or
    decompress the weight on their first call; the plan says why). Inductor itself skips cudagraphs for graphs
    on the CPU."""
    if not opts.cudagraphs:
        return False
    device = _device_of(ctx.example_inputs).type
    if device != "cuda":
        note = f"cudagraphs=True is ignored for a graph on {device}: CUDA graphs replay CUDA work only"
        ctx.warn_once(note)   # in the report and the compile's summary, not only Inductor's silence
        return True
    refusal = _cudagraphs_refusal(opts, ctx)
    if refusal is not None:
        log.warning("sparsecc: cudagraphs=True is ignored for a graph %s", refusal)
        return False
    return True


def _cudagraphs_refusal(opts: BackendOptions, ctx: CompileContext) -> Optional[str]:
    """Why the decided sites of a CUDA graph keep it from CUDA graphs (None: nothing does); see
    :func:`_uses_cudagraphs`."""
    if opts.kernels == "reference" and any(ctx.applied(site) for site in ctx.sites):
        return ("with sparse sites on the reference path (kernels='reference' synchronises with the host); use "
                "kernels='auto' or 'triton'")
    decided = [(site, ctx.decision(site)) for site in ctx.sites if ctx.applied(site)]
    unbound = [site.module for site, d in decided if isinstance(d.form, TwoFour) and d.plan is not None
               and d.plan.state.get("cslt_operand") is None]
    if unbound:
        return (f"whose 2:4 sites {', '.join(unbound)} have no cuSPARSELt operand bound at compile time (see the "
                "report's plan column): their first call compresses the weight, which a CUDA-graph capture forbids")
    return None


def _mark_bound_weights_static(ctx: CompileContext) -> None:
    """Mark the bound weight tensors (compressed weights, K-major copies, column norms) static for CUDA graphs.

    They keep their addresses for the life of the compile and are refreshed in
    place, so a replay reads them where they are instead of copying them into
    the graph's input buffers on every call. Inductor learns that from their
    placeholders (``_mark_bound_inputs``) and from the static fakes handed to it
    (``_static_fakes`` copies the mark); the tensors carry it for anything else
    that reads it from them.
    """
    for tensor in ctx.extra_inputs:
        torch._dynamo.mark_static_address(tensor)


def _lowering_config(opts: BackendOptions, cudagraphs: bool) -> Optional[dict]:
    """Inductor config patches for one graph: cudagraph trees when ``cudagraphs`` (:func:`_uses_cudagraphs`), and
    Inductor's C++ wrapper when ``options["cpp_wrapper"]`` asks for it (the graph's launches, the sparse kernels'
    included, then run from compiled C++ instead of Python: less host time per op, a longer first compile)."""
    patches = {"cpp_wrapper": True} if opts.cpp_wrapper else {}
    if cudagraphs:
        patches["triton.cudagraphs"] = True
    return patches or None


def _with_weights(compiled, ctx: CompileContext, check_weights: bool = False):
    """Wrap the compiled graph: pass the bound weights after the inputs, rebuilt when a parameter changed.

    A parameter that enters as a graph input is checked as passed (a new
    object or a bumped version); one read as a graph attribute is checked as
    bound. With ``check_weights`` every binding also compares a checksum of
    its parameter on every call.
    """
    bindings = ctx.bindings
    extra = ctx.extra_inputs
    if check_weights:
        sharded = [b.qualname for b in bindings if is_dtensor(b.param)]
        if sharded:
            # A checksum sees a change on the ranks whose shard changed only; the re-pruning gathers the whole
            # weight (a collective), so the other ranks would never join it.
            raise SpecError("is not supported for tensor-parallel weights", key="options.check_weights",
                            value=True, allowed=f"False (sharded weights: {', '.join(sharded)}); "
                            "updates through the parameters are seen without it (docs/distributed.md)")
        for b in bindings:
            b.watch()

    def run(*args):
        for b in bindings:
            b.refresh(args[b.input_index] if b.input_index is not None else b.param)
        full = list(args) + extra
        return compiled(*full)

    return run


class SparseccWarning(UserWarning):
    """What sparsecc says at every compile: how many sites it rewrote, and the spec rules that matched nothing."""


@dataclass
class _CompileReports:
    """The accumulated report of one compile: its options object and the module it compiled."""

    options: Any
    root: Any                # weakref to the compiled root module (None when unknown)
    report: Report


_current: Optional[_CompileReports] = None


def _same_compile(record: Optional[_CompileReports], options: Any, root: Any) -> bool:
    if record is None or options is None or record.options is not options:
        return False
    old_root = record.root() if record.root is not None else None
    return old_root is root


def emit_report(report: Report, opts: BackendOptions, owner: Any = None, root: Any = None) -> Report:
    """Add one graph's report to its compile's report; print or write it; warn with the compile's summary.

    A compile is one ``options`` object applied to one root module: graphs
    with the same owner and root (graph breaks, recompiles) accumulate, a new
    one starts afresh, so a ``report=`` file always describes the compile that
    wrote it. Returns the accumulated report.
    """
    global _current
    with _reports_lock:
        if not _same_compile(_current, owner, root):
            _current = _CompileReports(owner, weakref.ref(root) if root is not None else None,
                                       Report(kernels=report.kernels))
        total = _current.report
        total.extend(report)
        if opts.report is True:
            text = str(total)
            if log.isEnabledFor(logging.INFO) and log.hasHandlers():
                log.info("%s", text)   # logging is configured: one copy, through it
            else:
                print(text, file=sys.stderr)
        elif opts.report:
            total.save(str(opts.report))
    summary = f"sparsecc: {total.summary()}"
    log.warning("%s", summary)
    # warn_explicit: the message stands alone (no source line of Dynamo's or ours), once per compile.
    warnings.warn_explicit(summary, SparseccWarning, filename="sparsecc", lineno=0, module="sparsecc")
    return total


def last_report() -> Optional[Report]:
    """The report of the most recent compile in this process (all its graphs).

    The most recent compile is the one that compiled a graph last, or one that ``sparsecc.compile`` started since
    (a ``torch.compile(..., backend="sparsecc")`` starts when its first graph reaches the backend). A compile whose
    graphs have not reached the backend yet has an empty report (no sites, ``graphs == 0``); one whose first call ran
    without sparsecc (Dynamo handed it no graph, e.g. past its recompile limit) keeps that empty report, with a note
    saying so, never the previous compile's.
    """
    return _current.report if _current is not None else None


def reset_reports() -> None:
    """Forget the current compile's report (the next compile starts fresh)."""
    global _current
    with _reports_lock:
        _current = None
        _graphs.clear()


# Compiles made by sparsecc.compile whose first call is awaited: id(options) -> whether sparsecc's backend has been
# called for that options object. The caller holds the options object until it takes its entry back
# (first_call_check), so an id is never reused meanwhile.
_pending: dict = {}
# The frames Dynamo stopped compiling (its recompile limit) while a compile's first call was pending: id(options) ->
# their code, named. Such a frame runs dense although other graphs of the compile reached sparsecc.
_limited: Dict[int, List[str]] = {}


def begin_compile(options: dict, kernels: str = "auto", check: bool = True, spec: Optional[str] = None) -> None:
    """A new compile (``sparsecc.compile``) of ``options``: ``last_report()`` is its report from now on, empty until
    its graphs reach the backend (``spec`` names its spec), and with ``check`` its first call is checked
    (:func:`first_call_check`); without it (``disable=True``) the report says that nothing is compiled."""
    global _current
    _install_recompile_limit_filter()
    report = Report(kernels=kernels, spec=spec)
    if not check:
        report.notes.append("torch.compile(disable=True): nothing is compiled, the model runs as written")
    with _reports_lock:
        _current = _CompileReports(options, None, report)
        if check:
            _pending[id(options)] = False


def forget_compile(options_id: int) -> None:
    """Drop the pending first-call check of a compile whose compiled object is gone."""
    with _reports_lock:
        _pending.pop(options_id, None)
        _limited.pop(options_id, None)


def _backend_called(options: Any) -> None:
    if options is not None and id(options) in _pending:
        with _reports_lock:
            if id(options) in _pending:
                _pending[id(options)] = True


def first_call_check(options: dict, what: str, code: Any = None) -> bool:
    """After the first call of what ``sparsecc.compile`` returned: True when sparsecc's backend compiled a graph for
    ``options``; otherwise warn (``SparseccWarning`` and the ``sparsecc`` logger) that the model ran without
    sparsecc, note it in the compile's (empty) report, and return False. ``code``: the code object Dynamo keeps
    the compile's cache entries on, named in the warning."""
    with _reports_lock:
        ran = _pending.pop(id(options), True)
        limited = _limited.pop(id(options), [])
        record = _current if _current is not None and _current.options is options else None
    if ran and not limited:
        return True
    if limited:   # some graphs reached sparsecc, but Dynamo stopped compiling these frames: they ran dense
        message = (f"sparsecc: part of {what} ran without sparsecc (dense: its sites were not rewritten and are "
                   f"not in the report): Dynamo stopped compiling {', '.join(sorted(set(limited)))}. "
                   f"{no_graph_reason()}")
    else:
        message = (f"sparsecc: {what} ran without sparsecc (dense: no site rewritten, no report): Dynamo never "
                   f"handed sparsecc a graph for this compile. {no_graph_reason(code)}")
    if record is not None:
        record.report.notes.append(message)
    log.warning("%s", message)
    warnings.warn_explicit(message, SparseccWarning, filename="sparsecc", lineno=0, module="sparsecc")
    return False


class _RecompileLimitFilter(logging.Filter):
    """Dynamo's own recompile-limit warning, when the frame it stops compiling was being compiled for sparsecc
    (``torch.compile(model, backend="sparsecc")`` used directly, which sparsecc sees no call of): a
    ``SparseccWarning`` that the frame runs without sparsecc, and ``last_report()`` an empty report for that
    compile instead of the previous one's. Compiles made by ``sparsecc.compile`` are left to its first-call check.
    Records pass unchanged; an internal Dynamo layout this does not know only means no extra warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if "hit config." in str(record.msg) and "recompile_limit" in record.getMessage():
                self._warn(record)
        except Exception:   # never break Dynamo's logging
            pass
        return True

    @staticmethod
    def _warn(record: logging.LogRecord) -> None:
        global _current
        from torch._dynamo.eval_frame import innermost_backend

        frame = sys._getframe()
        while frame is not None and "compiler_fn" not in frame.f_locals:
            frame = frame.f_back
        if frame is None:
            return
        wrapper = innermost_backend(frame.f_locals["compiler_fn"])
        if getattr(wrapper, "compiler_fn", None) is not sparsecc_backend:
            return
        options = getattr(wrapper, "kwargs", {}).get("options")
        code = frame.f_locals.get("code")
        if options is not None and id(options) in _pending:
            # sparsecc.compile's first-call check says it, once, naming every frame Dynamo stopped compiling
            name = code_name(code) if hasattr(code, "co_name") else "a frame"
            with _reports_lock:
                _limited.setdefault(id(options), []).append(name)
            return
        message = (f"sparsecc: a torch.compile(..., backend=\"sparsecc\") frame runs without sparsecc (dense: no "
                   f"site rewritten): Dynamo stopped compiling it. {no_graph_reason(code)}")
        with _reports_lock:
            if _current is None or _current.options is not options:
                kernels = options.get("kernels", "auto") if isinstance(options, dict) else "auto"
                _current = _CompileReports(options, None, Report(kernels=kernels))
            _current.report.notes.append(message)
        log.warning("%s", message)
        warnings.warn_explicit(message, SparseccWarning, filename="sparsecc", lineno=0, module="sparsecc")


def _install_recompile_limit_filter() -> None:
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, _RecompileLimitFilter) for f in dynamo_log.filters):
        dynamo_log.addFilter(_RecompileLimitFilter())


def rewritten_graphs() -> List[Any]:
    """The FX graph modules compiled so far (after rewriting), oldest first."""
    return list(_graphs)


def register_torch_logs() -> None:
    """Make ``TORCH_LOGS=sparsecc`` / ``+sparsecc`` and ``torch._logging.set_logs`` know the ``sparsecc`` logger.

    torch parses TORCH_LOGS when it is imported, before sparsecc is; when the
    variable names sparsecc, the log settings are parsed again after
    registering, as for torch's own artifacts.
    """
    from torch._logging import _internal
    if _internal.log_registry.is_log("sparsecc") and "sparsecc" in _internal.log_registry.log_alias_to_log_qnames:
        return
    torch._logging._internal.register_log("sparsecc", "sparsecc")
    if "sparsecc" in os.environ.get(_internal.LOG_ENV_VAR, ""):
        _internal._parse_log_settings.cache_clear()
        _internal._init_logs()


def sparsecc_backend(gm, example_inputs, options: Optional[dict] = None, **kwargs):
    """The Dynamo backend: ``torch.compile(model, backend="sparsecc", options={spec, report, kernels})``."""
    register_torch_logs()
    _install_recompile_limit_filter()   # on first use, not at import: Dynamo's log is Dynamo's until sparsecc runs
    _backend_called(options)
    if kwargs:
        name = sorted(kwargs)[0]
        raise SpecError("is not a backend argument", key=name, value=kwargs[name],
                        allowed=f"settings passed as options= with keys {list(ALLOWED_OPTIONS)}")
    return compile_graph(gm, example_inputs, parse_options(options), owner=options)

