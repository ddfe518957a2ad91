"""``sparsecc tune``: build a model and calibration batches from Python callables, tune, write the spec."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, List, Optional


def _resolve(ref: str, what: str) -> Callable:
    """``module:attr`` (or ``module.attr``) to the object it names; errors say which argument was wrong."""
    module_name, sep, attr = ref.partition(":")
    if not sep:
        module_name, _, attr = ref.rpartition(".")
    if not module_name or not attr:
        raise SystemExit(f"sparsecc tune: {what} {ref!r} is not MODULE:CALLABLE")
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
                   help="MODULE:CALLABLE returning the model (or CALLABLE with --model-module MODULE)")
    p.add_argument("--model-module", help="module holding the --model callable")
    p.add_argument("--data", required=True,
                   help="calibration batches: a torch.save'd list of batches, or MODULE:CALLABLE returning them "
                        "(each batch a tensor, a tuple of arguments or a dict of keyword arguments)")
    p.add_argument("--target", type=float, default=0.5, help="average FFN activation sparsity (default 0.5)")
    p.add_argument("--out", required=True, help="the spec to write (.toml or .json)")
    p.add_argument("--criterion", choices=("magnitude", "weighted"), default="magnitude")
    p.add_argument("--attention-density", type=float, default=None,
                   help="also choose per-head attention forms with this mean density budget in (0, 1]")
    p.add_argument("--step", type=float, default=0.05, help="greedy sparsity step (default 0.05)")
    p.add_argument("--policy", choices=("auto", "force", "off"), default="auto", help="defaults.policy of the spec")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _load_data(ref: str) -> List:
    if os.path.exists(ref):
        import torch
        data = torch.load(ref, weights_only=False)
    else:
        data = _resolve(ref, "--data")()
    return list(data)


def cli_main(argv: Optional[List[str]] = None) -> int:
    """Run ``sparsecc tune`` with ``argv`` (default: sys.argv[1:]); returns the exit status."""
    from sparsecc.tune.tuner import tune

    args = _parser().parse_args(argv)
    ref = f"{args.model_module}:{args.model}" if args.model_module else args.model
    model = _resolve(ref, "--model")()
    batches = _load_data(args.data)
    spec = tune(model, batches, target=args.target, out=args.out, criterion=args.criterion, step=args.step,
                attention_density=args.attention_density, policy=args.policy, progress=not args.no_progress)
    achieved = spec.meta["tune"]["achieved"]
    print(f"sparsecc tune: wrote {args.out}: FFN sparsity {achieved['ffn_sparsity']:.3f} "
          f"(measured {achieved['ffn_sparsity_measured']:.3f}), output error {achieved['output_error']:.3e}"
          + (f", attention recall {achieved['attention_recall']:.4f} at density "
             f"{achieved['attention_density']:.3f}" if "attention_recall" in achieved else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
