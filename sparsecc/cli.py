"""The ``sparsecc`` command line.

    sparsecc check-spec SPEC
        validate a spec and print its resolved rules
    sparsecc explain MODULE:FACTORY --spec SPEC [--seq N] [--batch B] [--out REPORT]
        build a model from a factory, capture/match/decide, print the report
    sparsecc calibrate-hw [--device cuda] [--size N] [--no-save]
        measure copy bandwidth, GEMM rates and launch overhead; save a profile that later compiles use
    sparsecc import FORMAT FILE -o OUT [--modules-template T] [--threshold X | --sparsity S] [--sink N] [--recent N]
                    [--query-heads H] [--policy P]
        turn a published sparsity file (minference, duo_attention, compressed_tensors) into a spec
    sparsecc eval MODEL --spec SPEC --text FILE... [--ctx N] [--windows K] [--force]
        dense vs sparse perplexity of a causal LM through the compiled model (docs/tune.md)

A factory is a callable ``FACTORY()`` in an importable module. It returns
either a model, or ``(model, example_inputs)`` where example_inputs is a tuple
of positional arguments (then --seq/--batch are ignored). For a bare model,
the example input is ``torch.randint(0, vocab, (batch, seq))`` when the model
has an integer ``config.vocab_size``, else ``torch.randn(batch, seq, hidden)``
with ``hidden`` from the factory module's ``HIDDEN`` or the model's
``config.hidden_size``.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import List, Optional

EXIT_SPEC_ERROR = 2


def _at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (a sequence length, a batch size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected an integer >= 1")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsecc", description="sparsity compiler for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-spec", help="validate a spec and print the resolved rules")
    check.add_argument("spec", help="path to a .toml or .json spec")
    explain = sub.add_parser("explain", help="print the compile report for a model factory")
    explain.add_argument("factory", help="MODULE:FACTORY, e.g. examples.quickstart:build_model")
    explain.add_argument("--spec", default=None, help="spec file (.toml/.json); without it every site says 'no rule'")
    explain.add_argument("--seq", type=_at_least_one, default=128, help="sequence length of the example input")
    explain.add_argument("--batch", type=_at_least_one, default=1, help="batch size of the example input")
    explain.add_argument("--kernels", default="auto", choices=("auto", "triton", "reference"))
    explain.add_argument("--out", default=None, help="also write the report (.json, .md or .html)")
    hw = sub.add_parser("calibrate-hw", help="measure this machine's ceilings and save a hardware profile")
    hw.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    hw.add_argument("--size", type=int, default=None, help="GEMM edge (default 8192 on CUDA, 1024 on CPU)")
    hw.add_argument("--no-save", action="store_true", help="print the profile without saving it")
    imp = sub.add_parser("import", help="turn a published sparsity file into a spec (see docs/importers.md)")
    imp.add_argument("format", help="minference, duo_attention or compressed_tensors")
    imp.add_argument("file", help="the file to import (DuoAttention: the .tsv or its directory)")
    imp.add_argument("-o", "--out", required=True, help="the spec to write (.toml or .json)")
    imp.add_argument("--modules-template", default=None,
                     help='attention module path with {layer} (default "model.layers.{layer}.self_attn")')
    imp.add_argument("--threshold", type=float, default=None,
                     help="DuoAttention: gate value from which a KV head keeps full attention (give this or --sparsity)")
    imp.add_argument("--sparsity", type=float, default=None,
                     help="DuoAttention: quantile in [0, 1] of all gates below which KV heads stream "
                          "(DuoAttention's scripts use 0.5; give this or --threshold)")
    imp.add_argument("--sink", type=int, default=None, help="DuoAttention: sink tokens (default: sink_size)")
    imp.add_argument("--recent", type=int, default=None, help="DuoAttention: recent tokens (default: recent_size)")
    imp.add_argument("--query-heads", type=int, default=None,
                     help="DuoAttention: the model's query heads per layer (num_attention_heads)")
    imp.add_argument("--policy", default=None, help="defaults.policy of the written spec (auto, force, off)")
    imp.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                     help="compressed_tensors: a factory of the model you will compile (as for explain; one built "
                          "on the meta device is enough), so that class-name targets find their modules")
    # Listed for `sparsecc --help`; its arguments are parsed by sparsecc.tune.cli (main dispatches before parsing).
    sub.add_parser("tune", add_help=False,
                   help="tune a spec on calibration data (`sparsecc tune --help`; see docs/tune.md)")
    # Likewise parsed by sparsecc.tune.evalcli.
    sub.add_parser("eval", add_help=False,
                   help="dense vs sparse perplexity of a causal LM on text (`sparsecc eval --help`; docs/tune.md)")
    return parser


def _load_factory(text: str):
    if ":" not in text:
        raise SystemExit(f"sparsecc: factory {text!r} must look like MODULE:FACTORY")
    module_name, attr = text.split(":", 1)
    if "" not in sys.path:
        sys.path.insert(0, "")   # a factory module in the current folder
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SystemExit(f"sparsecc: factory {text!r}: cannot import {module_name!r} ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SystemExit(f"sparsecc: {module_name} has no callable {attr!r}")
    return module, factory


def _example_inputs(module, model, seq: int, batch: int):
    import torch
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        return (torch.randint(0, vocab, (batch, seq)),)
    hidden = getattr(module, "HIDDEN", None) or getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        raise SystemExit("sparsecc: cannot build an example input; return (model, inputs) from the factory "
                         "or define HIDDEN in its module")
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    return (torch.randn(batch, seq, hidden, dtype=dtype),)


def _calibrate_hw(args) -> int:
    import torch
    from sparsecc.cost.hardware import measure_profile, profile_for, save_profile
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sparsecc: --device cuda but no CUDA device is available", file=sys.stderr)
        return 1
    before = profile_for(device)
    profile = measure_profile(device, size=args.size)
    print(f"shipped/previous: {before}")
    print(f"measured:         {profile}")
    if not args.no_save:
        print(f"saved to {save_profile(profile, device)}; later compiles on this device use it")
    return 0


# The import command's flag for each importer keyword, so that its errors name what the user typed.
IMPORT_FLAGS = {"modules_template": "--modules-template", "threshold": "--threshold", "sparsity": "--sparsity",
                "sink": "--sink", "recent": "--recent", "query_heads": "--query-heads", "policy": "--policy",
                "model": "--model"}


def _as_flags(text: str) -> str:
    """An importer's error text with its option names written as the import command's flags: a key
    (``query_heads``, ``threshold and sparsity``), ``name = value``, ``name=`` and ``name (what it means)``.
    Other words stay (``the model's``, ``model.layers.{layer}``)."""
    for keyword, flag in IMPORT_FLAGS.items():
        text = re.sub(rf"(?<![-\w.]){keyword}(?: = |=(?!=)| (?=\()|$| and |(?=, ))",
                      lambda m: flag + m.group(0)[len(keyword):].replace(" = ", " ").replace("=", ""), text)
    return text


def _import(args) -> int:
    from sparsecc.importers import check_import_options, import_spec
    from sparsecc.importers.compressed_tensors import storage_note
    from sparsecc.spec import SpecError
    given = {"modules_template": args.modules_template, "threshold": args.threshold, "sparsity": args.sparsity,
             "sink": args.sink, "recent": args.recent, "query_heads": args.query_heads, "policy": args.policy,
             "model": args.model}
    options = {k: v for k, v in given.items() if v is not None}
    try:
        check_import_options(args.format, options)   # before a model factory runs for --model
        if args.model:
            built = _load_factory(args.model)[1]()
            options["model"] = built[0] if isinstance(built, tuple) else built
        spec = import_spec(args.format, args.file, **options)
    except SpecError as err:   # the key of an error in the imported file is that file's own
        raise err.reworded(_as_flags, key=isinstance(err.file, str) and err.file.endswith(" import>")) from None
    spec.save(args.out)
    counts = ", ".join(f"{len(spec.rules(kind))} {kind}" for kind in ("attention", "ffn", "linear"))
    print(f"{args.out}: imported {args.file} ({spec.meta['import']['format']}, sha256 "
          f"{spec.meta['import']['sha256'][:12]}...): {counts} rules")
    note = storage_note(spec)
    if note:
        print(f"note: {note}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``sparsecc`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tune"]:
        from sparsecc.tune.cli import cli_main
        return cli_main(argv[1:])
    if argv[:1] == ["eval"]:
        from sparsecc.tune.evalcli import eval_main
        return eval_main(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "explain" and args.out:   # checked before the compile, not after it
        from sparsecc.report.render import REPORT_SUFFIXES, report_suffix, unwritable_reason
        if not report_suffix(args.out):
            parser.error(f"--out {args.out!r}: the report's suffix must be one of {', '.join(REPORT_SUFFIXES)}")
        problem = unwritable_reason(args.out)
        if problem:
            parser.error(f"--out {args.out!r} cannot be written: {problem}")
    from sparsecc.spec import SpecError, load_spec
    try:
        if args.command == "check-spec":
            spec = load_spec(args.spec)
            print(f"{args.spec}: ok (version {spec.version}, "
                  f"{len(spec.attention)} attention, {len(spec.ffn)} ffn, {len(spec.linear)} linear rules)")
            print(spec)
            for rule in spec.ffn:   # valid, but a no-op until calibrated: said here rather than at the first compile
                if not getattr(rule.form, "calibrated", True):
                    print(f"note: {rule.form.uncalibrated_note(rule.key)}")
            return 0
        if args.command == "calibrate-hw":
            return _calibrate_hw(args)
        if args.command == "import":
            return _import(args)
        import torch

        import sparsecc
        module, factory = _load_factory(args.factory)
        built = factory()
        if isinstance(built, tuple):
            model, inputs = built[0], tuple(built[1])
        else:
            model, inputs = built, None
        if not isinstance(model, torch.nn.Module):
            print(f"sparsecc explain: {args.factory}() returned {type(model).__name__}, not an nn.Module or a "
                  "(model, inputs) pair", file=sys.stderr)
            return EXIT_SPEC_ERROR
        model.eval()
        if inputs is None:
            inputs = _example_inputs(module, model, args.seq, args.batch)
        report = sparsecc.explain(model, *inputs, spec=args.spec, kernels=args.kernels)
        print(report)
        if args.out:
            report.save(args.out)
            print(f"report written to {args.out}")
        return 0
    except SpecError as err:
        print(f"sparsecc: spec error: {err}", file=sys.stderr)
        return EXIT_SPEC_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
