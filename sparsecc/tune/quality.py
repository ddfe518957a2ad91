"""Perplexity of a causal language model, eager or compiled with sparsecc, and dense-vs-sparse evaluation.

* :func:`read_texts` reads text files (or the ``pydoc`` shortcut: the pydoc topics that ship with Python).
* :func:`token_windows` cuts the tokenised text into windows of ``ctx`` tokens.
* :func:`perplexity` is exp of the token-weighted mean negative log-likelihood over those windows.
* :func:`evaluate` gives dense and sparse perplexity of one spec, through ``sparsecc.compile``, and fails when
  the spec rewrote no site (a "sparse" number with nothing rewritten would only measure the dense model twice).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

PYDOC = "pydoc"   # the --text shortcut for pydoc_data.topics
DOCSTRINGS = "docstrings"   # the --text shortcut for the standard library's docstrings
LOWERINGS = ("eager", "inductor")


class NothingRewrittenError(RuntimeError):
    """The spec rewrote no site of the compiled model, so a sparse perplexity would be the dense one."""


def pydoc_text() -> str:
    """The pydoc help topics that ship with Python (``pydoc_data.topics``), in sorted key order, blank-line separated.

    About 465,000 characters of English prose with code (CPython 3.11): text every Python has, for tests and docs.
    """
    from pydoc_data import topics
    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


def stdlib_module_trees():
    """The parsed source (``ast.Module``) of each pure-Python standard-library module, in sorted
    ``sys.stdlib_module_names`` order (``name.py``, else ``name/__init__.py``; C-only modules and files that do
    not parse are skipped)."""
    import ast
    import sys

    stdlib = Path(os.__file__).parent
    for name in sorted(sys.stdlib_module_names):
        path = stdlib / f"{name}.py"
        if not path.exists():
            path = stdlib / name / "__init__.py"
        if not path.exists():
            continue
        try:
            yield ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue


def docstrings_text() -> str:
    """The docstrings of the standard library's pure-Python modules, blank-line separated, in a fixed order.

    Modules in sorted ``sys.stdlib_module_names`` order (``name.py``, else
    ``name/__init__.py``; C-only modules have none), and within a module the
    docstrings of the module, its classes and its functions in ``ast.walk``
    order. About 1,037,000 characters (274,902 SmolLM2 tokens) on CPython 3.11.7, and disjoint from the
    pydoc topics (those are the language reference's prose): calibrate on one,
    evaluate on the other.
    """
    import ast

    parts = []
    for tree in stdlib_module_trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
    return "\n\n".join(parts)


SHORTCUT_TEXTS = {PYDOC: pydoc_text, DOCSTRINGS: docstrings_text}
"""``--text`` names that stand for a text shipped with Python rather than a file."""


def read_texts(sources: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> str:
    """The text of ``sources`` (file paths, ``"pydoc"`` for :func:`pydoc_text` or ``"docstrings"`` for
    :func:`docstrings_text`), joined by blank lines.

    A file literally named ``pydoc`` or ``docstrings`` is read when written as a path (``./pydoc``).
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError("no text given: pass at least one file (or 'pydoc')")
    parts = []
    for src in sources:
        if str(src) in SHORTCUT_TEXTS:
            parts.append(SHORTCUT_TEXTS[str(src)]())
            continue
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"text file {str(src)!r} does not exist (or is not a file); "
                                    f"give text files, '{PYDOC}' for the pydoc topics or '{DOCSTRINGS}' for the "
                                    "standard library's docstrings (both ship with Python)")
        parts.append(path.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


@dataclass(frozen=True)
class Window:
    """``ids`` (1-D, ``ctx`` tokens) and ``score_from``: tokens at positions >= score_from are scored (>= 1)."""

    ids: torch.Tensor
    score_from: int

    @property
    def scored(self) -> int:
        """How many tokens of this window count towards the perplexity."""
        return self.ids.numel() - self.score_from


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The text's token ids (1-D int64), without special tokens: windows are cut from one running token stream."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).flatten()


def token_windows(ids: torch.Tensor, ctx: int, windows: Optional[int] = None, stride: Optional[int] = None,
                  skip: int = 0) -> List[Window]:
    """Windows of ``ctx`` tokens over ``ids``, the first ``skip`` windows left out, at most ``windows`` of them.

    Non-overlapping (``stride`` None or ``ctx``): window i is tokens ``[i*ctx, (i+1)*ctx)``; every token
    but the window's first is scored, each predicted from the tokens before it in its window only.
    Strided (``stride < ctx``): window i starts at ``i*stride``; the first window scores tokens 1..ctx-1,
    later ones only their last ``stride`` tokens (the ones no earlier window scored), so every token after
    the first is scored once, with at least ``ctx - stride`` tokens of context. Only whole windows are used.
    """
    ids = torch.as_tensor(ids).flatten()
    stride = ctx if stride is None else stride
    if not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"ctx={ctx!r} is not allowed; expected an integer >= 2 (tokens per window)")
    if not isinstance(stride, int) or not 1 <= stride <= ctx:
        raise ValueError(f"stride={stride!r} is not allowed; expected an integer in [1, ctx={ctx}]")
    if windows is not None and (not isinstance(windows, int) or windows < 1):
        raise ValueError(f"windows={windows!r} is not allowed; expected an integer >= 1 (or None for all)")
    available = 0 if ids.numel() < ctx else (ids.numel() - ctx) // stride + 1
    wanted = available - skip if windows is None else windows
    if wanted < 1 or skip + wanted > available:
        raise ValueError(f"the text has {ids.numel()} tokens: {available} whole windows of ctx={ctx} "
                         f"(stride {stride}), but {skip} + {windows if windows is not None else 'all'} are "
                         "needed; give more text or a smaller ctx/windows")
    out = []
    for i in range(skip, skip + wanted):
        start = i * stride
        out.append(Window(ids[start:start + ctx], 1 if i == 0 else ctx - stride if stride < ctx else 1))
    return out


@dataclass
class Perplexity:
    """exp(``nll`` / ``tokens``): ``nll`` the summed negative log-likelihood (nats) over ``tokens`` scored tokens."""

    nll: float
    tokens: int
    windows: int

    @property
    def mean_nll(self) -> float:
        """Token-weighted mean negative log-likelihood, in nats."""
        return self.nll / self.tokens

    @property
    def value(self) -> float:
        """The perplexity."""
        return math.exp(self.mean_nll)


def _logits(output) -> torch.Tensor:
    """The logits of a model output: ``.logits`` (transformers), a tensor, or the first item of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}, which has no logits tensor; "
                        "perplexity needs a causal LM returning logits [batch, seq, vocab]")
    return logits


def _device(model) -> torch.device:
    module = getattr(model, "_orig_mod", model)
    param = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
    return param.device if param is not None else torch.device("cpu")


def model_kwargs(model) -> Dict[str, object]:
    """Keyword arguments for a forward over a whole window: no KV cache for transformers models (none is reused)."""
    config = getattr(getattr(model, "_orig_mod", model), "config", None)
    return {"use_cache": False} if hasattr(config, "use_cache") else {}


def window_nll(logits: torch.Tensor, window: Window) -> float:
    """Summed NLL (nats, float64) of the window's scored tokens, each predicted by the logits one position before."""
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[:-1].double(), dim=-1)
    targets = window.ids.to(logits.device)[1:]
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    return float(nll[window.score_from - 1:].sum())


def perplexity(model, windows: Sequence[Window], *, progress: bool = True, desc: str = "perplexity",
               after_first: Optional[Callable[[], None]] = None) -> Perplexity:
    """Perplexity of a causal LM over ``windows`` (batch 1 each): exp of the token-weighted mean NLL.

    ``model`` is called as ``model(input_ids=ids[None], use_cache=False)``
    (``use_cache`` only for models with a transformers config), eagerly or as
    compiled by ``sparsecc.compile``, under ``torch.no_grad()``;
    ``after_first`` runs after the first window (e.g. to check a compile
    report before spending time on the rest).
    """
    from tqdm.auto import tqdm

    device = _device(model)
    extra = model_kwargs(model)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for i, window in enumerate(tqdm(windows, desc=desc, unit="window", disable=not progress)):
            logits = _logits(model(input_ids=window.ids[None].to(device), **extra))
            nll += window_nll(logits[0], window)
            tokens += window.scored
            if i == 0 and after_first is not None:
                after_first()
    return Perplexity(nll, tokens, len(windows))


@contextlib.contextmanager
def lowering(kind: Optional[str]):
    """Set SPARSECC_LOWERING for the duration (``eager`` runs the rewritten graph without Inductor)."""
    from sparsecc.backend import LOWERING_ENV
    if kind is None:
        yield
        return
    if kind not in LOWERINGS:
        raise ValueError(f"lowering={kind!r} is not allowed; expected one of {LOWERINGS}")
    old = os.environ.get(LOWERING_ENV)
    os.environ[LOWERING_ENV] = kind
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(LOWERING_ENV, None)
        else:
            os.environ[LOWERING_ENV] = old


def needs_calibration(spec) -> bool:
    """True when some FFN rule gives a ``sparsity`` target without thresholds (not applied until calibrated)."""
    from sparsecc.forms import ActivationThreshold
    return any(isinstance(r.form, ActivationThreshold) and r.form.sparsity is not None and not r.form.thresholds
               for r in spec.ffn)


def forced(spec):
    """``spec`` with ``defaults.policy = "force"`` (rules with their own policy keep it)."""
    return dataclasses.replace(spec, defaults=dataclasses.replace(spec.defaults, policy="force"))


@dataclass
class Evaluation:
    """Dense and sparse perplexity of one spec on the same windows, with what the compile rewrote."""

    dense: Perplexity
    sparse: Perplexity
    rewritten: Dict[str, int]      # kind -> distinct modules rewritten
    sites: Dict[str, int]          # kind -> distinct modules found
    summary: str                   # the report's one-line summary
    spec: object                   # the spec compiled (calibrated and/or forced when asked)
    needle_dense: Optional[object] = None    # NeedleResult of the dense model, when needle trials were given
    needle_sparse: Optional[object] = None   # NeedleResult through the compiled model

    @property
    def relative_change(self) -> float:
        """sparse / dense - 1."""
        return self.sparse.value / self.dense.value - 1.0

    def lines(self) -> List[str]:
        """Human-readable result lines (the ``sparsecc eval`` output)."""
        counts = ", ".join(f"{kind} {self.rewritten.get(kind, 0)}/{n}" for kind, n in self.sites.items())
        return [f"sites rewritten: {sum(self.rewritten.values())} ({counts})",
                f"dense perplexity:  {self.dense.value:.4f}  (mean NLL {self.dense.mean_nll:.5f} nats)",
                f"sparse perplexity: {self.sparse.value:.4f}  (mean NLL {self.sparse.mean_nll:.5f} nats)",
                f"relative change:   {100 * self.relative_change:+.2f}%  over {self.dense.tokens} tokens in "
                f"{self.dense.windows} windows"] + self.needle_lines()

    def needle_lines(self) -> List[str]:
        """The needle-retrieval lines (none without needle trials)."""
        if self.needle_dense is None:
            return []
        d, s = self.needle_dense, self.needle_sparse
        ratio = s.rate / d.rate if d.rate > 0 else float("nan")
        return [f"needle exact match: dense {sum(d.hits)}/{len(d.hits)} ({d.rate:.3f}), sparse "
                f"{sum(s.hits)}/{len(s.hits)} ({s.rate:.3f}), sparse/dense {ratio:.3f}"]


def site_counts(report) -> tuple:
    """({kind: distinct modules rewritten}, {kind: distinct modules found}) of a report (graphs may repeat sites)."""
    found: Dict[str, set] = {}
    applied: Dict[str, set] = {}
    for s in report.sites if report is not None else ():
        found.setdefault(s.kind, set()).add(s.module)
        if s.applied:
            applied.setdefault(s.kind, set()).add(s.module)
    return ({k: len(v) for k, v in applied.items()}, {k: len(v) for k, v in found.items()})


def default_kernels(model) -> str:
    """``reference`` for a model on CPU (the exact reference ops), ``auto`` on CUDA (the kernels)."""
    return "auto" if _device(model).type == "cuda" else "reference"


def evaluate(model, spec, windows: Sequence[Window], *, kernels: Optional[str] = None, force: bool = False,
             calibration: Sequence[Window] = (), lowering_kind: Optional[str] = None, dense: Optional[Perplexity] = None,
             needle: Sequence = (), progress: bool = True) -> Evaluation:
    """Dense perplexity of ``model`` (eager) and sparse perplexity through ``sparsecc.compile(model, spec)``.

    * ``kernels``: default :func:`default_kernels`. ``force``: compile with
      ``defaults.policy = "force"`` (on CPU the cost model keeps most sites dense).
    * A spec with uncalibrated ``sparsity`` targets is calibrated with
      ``sparsecc.calibrate`` on ``calibration`` windows first (give windows
      disjoint from ``windows``); without them that is a ValueError.
    * ``lowering_kind``: ``eager`` or ``inductor`` (SPARSECC_LOWERING), default as set.
    * ``dense``: a dense result already measured on the same windows (skips that run).
    * ``needle``: :class:`sparsecc.tune.needle.NeedleTrial` s, run through the dense
      model and the compiled one (the exact-match rates land in the result).
      Give trials of the windows' length: the compiled model then serves them without
      a second compile.

    Raises :class:`NothingRewrittenError` after the first sparse window when no site was rewritten.
    """
    import sparsecc
    from sparsecc.backend import reset_reports
    from sparsecc.spec import load_spec

    loaded = load_spec(spec)
    if loaded is None:
        raise ValueError("evaluate needs a spec (a path, dict or Spec); without one nothing is rewritten")
    if needs_calibration(loaded):
        if not calibration:
            raise ValueError("the spec has activation_threshold rules with a sparsity target and no thresholds; "
                             "give calibration windows (disjoint from the evaluated ones) to calibrate them")
        batches = [{"input_ids": w.ids[None].to(_device(model)), **model_kwargs(model)} for w in calibration]
        loaded = sparsecc.calibrate(model, batches, loaded, progress=progress)
    if force:
        loaded = forced(loaded)
    kernels = kernels or default_kernels(model)
    if dense is None:
        dense = perplexity(model, windows, progress=progress, desc="dense perplexity")
    needle_dense = needle_sparse = None
    if needle:
        from sparsecc.tune.needle import needle_check
        needle_dense = needle_check(model, needle, progress=progress, desc="dense needle")
    torch._dynamo.reset()
    reset_reports()
    state = {}

    def check():
        rewritten, found = site_counts(sparsecc.last_report())
        state.update(rewritten=rewritten, found=found)
        if not rewritten:
            summary = sparsecc.last_report().summary() if sparsecc.last_report() else "no report (nothing compiled)"
            hint = "" if force else "; on CPU the cost model keeps sites dense under policy 'auto': try --force"
            raise NothingRewrittenError(f"the spec rewrote no site, so a sparse perplexity would be the dense one "
                                        f"({summary}){hint}")

    try:
        with lowering(lowering_kind):
            compiled = sparsecc.compile(model, spec=loaded, kernels=kernels)
            sparse = perplexity(compiled, windows, progress=progress, desc="sparse perplexity", after_first=check)
            if needle:
                needle_sparse = needle_check(compiled, needle, progress=progress, desc="sparse needle")
        summary = sparsecc.last_report().summary()
    finally:
        torch._dynamo.reset()
    return Evaluation(dense, sparse, state["rewritten"], state["found"], summary, loaded, needle_dense, needle_sparse)
