"""``sparsecc tune``: build a model and calibration batches from Python callables, tune, write the spec."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, List, Optional

from sparsecc.tune.tuner import TUNE_MODES


def _resolve(ref: str, what: str) -> Callable:
    """``module:attr`` (or ``module.attr``) to the object it names; errors say which argument was wrong."""
    module_name, sep, attr = ref.partition(":")
    if not sep:
        module_name, _, attr = ref.rpartition(".")
    if not module_name or not attr:
        raise SystemExit(f"sparsecc tune: {what} {ref!r} is not MODULE:CALLABLE")
    if "" not in sys.path:
        sys.path.insert(0, "")   # a factory module in the current folder, as `sparsecc explain` finds it
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SystemExit(f"sparsecc tune: {what} {ref!r}: cannot import {module_name!r} ({err})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise SystemExit(f"sparsecc tune: {what} {ref!r}: {module_name!r} has no attribute {attr!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsecc tune", description="Tune a sparsity spec on calibration data.")
    p.add_argument("--model", required=True,
                   help="MODULE:CALLABLE returning the model (or CALLABLE with --model-module MODULE), or a causal "
                        "LM reference: smollm2-135m, a .gguf file, a saved directory or a hub id")
    p.add_argument("--model-module", help="module holding the --model callable")
    p.add_argument("--data", required=True,
                   help="calibration batches: a torch.save'd list of batches, or MODULE:CALLABLE returning them "
                        "(each batch a tensor, a tuple of arguments or a dict of keyword arguments)")
    p.add_argument("--target", type=float, default=0.5, help="average FFN activation sparsity (default 0.5)")
    p.add_argument("--out", required=True, help="the spec to write (.toml or .json)")
    p.add_argument("--criterion", choices=("magnitude", "weighted"), default="magnitude")
    p.add_argument("--method", choices=("greedy", "separable"), default="greedy",
                   help="greedy search, or the sensitivity table's separable allocation blended with uniform")
    p.add_argument("--mode", choices=TUNE_MODES, default="input",
                   help="FFN thresholds on the projections' inputs (TEAL), on act(gate) (CATS), or either per "
                        "site (mixed; needs --method separable)")
    p.add_argument("--error", choices=("relative", "kl"), default="relative",
                   help="the output error minimised: relative squared error of the first output, or the "
                        "next-token KL of a causal LM")
    p.add_argument("--attention-block", type=int, default=64,
                   help="attention density counted in blocks of N x N queries x keys (default 64; 1: entries)")
    p.add_argument("--attention-density", type=float, default=None,
                   help="also choose per-head attention forms with this mean density budget in (0, 1]")
    p.add_argument("--step", type=float, default=0.05, help="greedy sparsity step (default 0.05)")
    p.add_argument("--policy", choices=("auto", "force", "off"), default="auto", help="defaults.policy of the spec")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    text = p.add_argument_group("perplexity", "with --text, also report dense vs tuned perplexity of a causal LM")
    text.add_argument("--text", nargs="+", metavar="FILE",
                      help="text files, or 'pydoc' for the pydoc topics shipped with Python")
    text.add_argument("--tokenizer", help="model reference to take the tokenizer from (default: --model's, "
                                          "when it is a model reference)")
    text.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    text.add_argument("--windows", type=int, default=2, help="windows from the start of the text (default 2)")
    text.add_argument("--stride", type=int, default=None, help="strided windows (default: non-overlapping)")
    return p


# What --data names when it is a file rather than MODULE:CALLABLE.
DATA_SUFFIXES = (".pt", ".pth", ".pkl", ".bin")


def _load_data(ref: str) -> List:
    if os.path.exists(ref):
        import torch
        try:
            data = torch.load(ref, weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file: say which and why, without a traceback
            raise SystemExit(f"sparsecc tune: --data {ref!r} is not a torch.save'd list of batches "
                             f"({type(err).__name__}: {err})") from None
    elif ref.lower().endswith(DATA_SUFFIXES) or os.sep in ref:
        raise SystemExit(f"sparsecc tune: --data {ref!r}: no such file")
    else:
        data = _resolve(ref, "--data")()
    try:
        batches = list(data)
    except TypeError:
        raise SystemExit(f"sparsecc tune: --data {ref!r} gave {type(data).__name__}, not a list of "
                         "batches") from None
    if not batches:
        raise SystemExit(f"sparsecc tune: --data {ref!r} gave no batches; tuning needs at least one")
    return batches


def cli_main(argv: Optional[List[str]] = None) -> int:
    """Run ``sparsecc tune`` with ``argv`` (default: sys.argv[1:]); returns the exit status."""
    from sparsecc.spec import SpecError
    from sparsecc.tune.models import ModelLoadError, is_model_ref, load_model
    from sparsecc.tune.tuner import TuneArgumentError, check_tune_arguments, tune

    parser = _parser()
    args = parser.parse_args(argv)
    if args.mode == "mixed" and args.method != "separable":
        parser.error("--mode mixed chooses modes on the sensitivity tables: it needs --method separable")
    if args.mode == "gate" and args.criterion != "magnitude":
        parser.error(f"--criterion {args.criterion}: gate mode compares |act(x W_gate)| itself, so only "
                     "--criterion magnitude is allowed with --mode gate")
    try:   # before the model loads: a bad argument never costs a calibration run
        check_tune_arguments(target=args.target, step=args.step, attention_density=args.attention_density,
                             attention_block=args.attention_block, out=args.out)
    except TuneArgumentError as err:   # the flags are the arguments' names with dashes
        parser.error(f"--{err.argument.replace('_', '-')}: {err}")
    except SpecError as err:
        parser.error(f"--out: {err}")
    tokenizer = None
    try:
        if not args.model_module and is_model_ref(args.model):
            model, tokenizer = load_model(args.model)
        else:
            ref = f"{args.model_module}:{args.model}" if args.model_module else args.model
            model = _resolve(ref, "--model")()
        if args.tokenizer:
            _, tokenizer = load_model(args.tokenizer)
    except ModelLoadError as err:
        raise SystemExit(f"sparsecc tune: --model/--tokenizer: {err}") from None
    if args.text and tokenizer is None:
        raise SystemExit("sparsecc tune: --text needs a tokenizer: give --tokenizer, or a model reference as --model")
    windows = _text_windows(tokenizer, args) if args.text else None   # text errors before the long tuning run
    batches = _load_data(args.data)
    spec = tune(model, batches, target=args.target, out=args.out, criterion=args.criterion, step=args.step,
                method=args.method, mode=args.mode, error_fn=args.error,
                attention_density=args.attention_density, attention_block=args.attention_block, policy=args.policy,
                progress=not args.no_progress)
    achieved = spec.meta["tune"]["achieved"]
    print(f"sparsecc tune: wrote {args.out}: FFN sparsity {achieved['ffn_sparsity']:.3f} "
          f"(measured {achieved['ffn_sparsity_measured']:.3f}), output error {achieved['output_error']:.3e}"
          + (f", attention recall {achieved['attention_recall']:.4f} at density "
             f"{achieved['attention_density']:.3f}" if "attention_recall" in achieved else ""))
    if windows is not None:
        return _report_perplexity(model, spec, windows, args)
    return 0


def _text_windows(tokenizer, args):
    from sparsecc.tune.quality import read_texts, token_windows, tokenize
    try:
        return token_windows(tokenize(tokenizer, read_texts(args.text)), args.ctx, args.windows, args.stride)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"sparsecc tune: --text: {err}") from None


def _report_perplexity(model, spec, windows, args) -> int:
    """Dense vs tuned perplexity on the --text windows, the tuned spec compiled with policy forced.

    The written spec keeps --policy; the measurement forces it because a perplexity of sites the cost model
    kept dense would say nothing about the thresholds (on CPU, ``auto`` keeps most sites dense).
    """
    from sparsecc.tune.quality import NothingRewrittenError, default_kernels, evaluate
    lowering = "inductor" if default_kernels(model) == "auto" else "eager"
    try:
        result = evaluate(model, spec, windows, force=True, lowering_kind=lowering, progress=not args.no_progress)
    except NothingRewrittenError as err:
        print(f"sparsecc tune: --text: {err}", file=sys.stderr)
        return 1
    print(f"sparsecc tune: perplexity on {' '.join(args.text)} ({result.dense.windows} windows of {args.ctx} "
          f"tokens, tuned spec compiled with policy forced): dense {result.dense.value:.4f}, tuned "
          f"{result.sparse.value:.4f} ({100 * result.relative_change:+.2f}%); {result.lines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
