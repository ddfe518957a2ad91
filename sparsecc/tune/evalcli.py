"""``sparsecc eval``: dense vs sparse perplexity of a causal LM on text files, through ``sparsecc.compile``.

    sparsecc eval MODEL --spec S --text FILE [FILE ...] [--ctx N] [--windows K] [--stride S]
                  [--calib-windows C] [--needle N] [--force] [--kernels K] [--lowering L] [--device D] [--dtype T]

MODEL is a model reference (``smollm2-135m``, a ``.gguf`` file, a saved directory or a hub id; see
:mod:`sparsecc.tune.models`) or ``MODULE:CALLABLE`` returning ``(model, tokenizer)`` (or a model, with
``--tokenizer`` naming a reference to take the tokenizer from). Exit status: 0 done, 1 the spec rewrote no
site, 2 a bad argument, spec, model or text.

``--needle N`` also runs N needle-retrieval trials of ``--ctx`` tokens over the same text, dense and sparse
(:mod:`sparsecc.tune.needle`), and prints both exact-match rates.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

EXIT_NOTHING_REWRITTEN = 1
EXIT_USAGE = 2


def parser() -> argparse.ArgumentParser:
    """The ``sparsecc eval`` argument parser."""
    p = argparse.ArgumentParser(prog="sparsecc eval",
                                description="Dense vs sparse perplexity of a causal LM through sparsecc.compile.")
    p.add_argument("model", help="smollm2-135m, a .gguf file, a saved model directory, a hub id, or "
                                 "MODULE:CALLABLE returning (model, tokenizer)")
    p.add_argument("--spec", required=True, help="the spec to evaluate (.toml or .json)")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE",
                   help="text files (UTF-8, joined by blank lines), or 'pydoc' for the pydoc topics shipped with Python")
    p.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=int, default=2, help="windows evaluated, from the start of the text (default 2)")
    p.add_argument("--stride", type=int, default=None,
                   help="start a window every STRIDE tokens, scoring only its last STRIDE (default: ctx, "
                        "non-overlapping windows)")
    p.add_argument("--calib-windows", type=int, default=1,
                   help="windows after the evaluated ones that calibrate sparsity-only FFN rules (default 1)")
    p.add_argument("--needle", type=int, default=0, metavar="N",
                   help="also run N needle-retrieval trials of ctx tokens over the text, dense and sparse (default 0)")
    p.add_argument("--needle-seed", type=int, default=0, help="seed of the needle trials (default 0)")
    p.add_argument("--force", action="store_true",
                   help="compile with defaults.policy = force (CPU: the cost model keeps most sites dense)")
    p.add_argument("--kernels", choices=("auto", "triton", "reference"), default=None,
                   help="default: reference on CPU, auto on CUDA")
    p.add_argument("--lowering", choices=("eager", "inductor"), default=None,
                   help="run the rewritten graph eagerly or through Inductor (default: eager on CPU, where "
                        "Inductor's compile of a whole LM takes minutes; inductor on CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the model (default: as loaded; GGUF dequantises to float32)")
    p.add_argument("--tokenizer", default=None, help="model reference to take the tokenizer from "
                                                     "(when MODEL is a factory returning only a model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def load(ref: str, tokenizer_ref: Optional[str] = None, dtype=None, device=None):
    """(model in eval mode, tokenizer) for a model reference or a ``MODULE:CALLABLE`` factory."""
    from sparsecc.tune.models import ModelLoadError, is_model_ref, load_model

    # Anything that is not MODULE:CALLABLE goes to the loader, whose errors list what a reference may be.
    if is_model_ref(ref) or ":" not in ref:
        model, tokenizer = load_model(ref, dtype=dtype, device=device)
    else:
        module_name, _, attr = ref.partition(":")
        sys.path.insert(0, "")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ModelLoadError(f"model {ref!r}: cannot load factory {attr!r} from {module_name!r} ({err}); "
                                 "expected a model reference or MODULE:CALLABLE") from None
        built = factory()
        model, tokenizer = built if isinstance(built, tuple) else (built, None)
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        model.eval()
    if tokenizer_ref is not None:
        _, tokenizer = load_model(tokenizer_ref)
    if tokenizer is None:
        raise ModelLoadError(f"model {ref!r} came without a tokenizer: return (model, tokenizer) from the "
                             "factory or give --tokenizer")
    return model, tokenizer


def windows_for(tokenizer, texts, ctx: int, windows: int, stride: Optional[int], calib_windows: int):
    """(evaluated windows, calibration windows after them: non-overlapping, disjoint from the evaluated tokens)."""
    from sparsecc.tune.quality import read_texts, token_windows, tokenize

    ids = tokenize(tokenizer, read_texts(texts))
    evaluated = token_windows(ids, ctx, windows, stride)
    end = (windows - 1) * (stride or ctx) + ctx
    calibration = token_windows(ids[end:], ctx, calib_windows) if calib_windows else []
    return evaluated, calibration


def eval_main(argv: Optional[List[str]] = None) -> int:
    """Run ``sparsecc eval`` with ``argv``; returns the exit status (0, 1 nothing rewritten, 2 bad input)."""
    import torch
    from sparsecc.spec import SpecError, load_spec
    from sparsecc.tune.models import ModelLoadError
    from sparsecc.tune.quality import NothingRewrittenError, evaluate

    args = parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        spec = load_spec(args.spec)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device} but no CUDA device is available")
        model, tokenizer = load(args.model, args.tokenizer, dtype=dtype, device=torch.device(device))
        if args.calib_windows < 0:
            raise ValueError(f"--calib-windows {args.calib_windows} is not allowed; expected an integer >= 0")
        evaluated, calibration = windows_for(tokenizer, args.text, args.ctx, args.windows, args.stride,
                                             args.calib_windows)
        if args.needle < 0:
            raise ValueError(f"--needle {args.needle} is not allowed; expected an integer >= 0 (trials)")
        needle = []
        if args.needle:
            from sparsecc.tune.needle import needle_trials
            from sparsecc.tune.quality import read_texts
            needle = needle_trials(tokenizer, read_texts(args.text), args.ctx, args.needle, seed=args.needle_seed)
        lowering = args.lowering or ("inductor" if device.startswith("cuda") else "eager")
        print(f"sparsecc eval: {args.model}, spec {args.spec}, text {' '.join(args.text)}: {len(evaluated)} "
              f"windows of {args.ctx} tokens ({'stride ' + str(args.stride) if args.stride else 'non-overlapping'}), "
              f"device {device}, kernels {args.kernels or 'default'}, lowering {lowering}"
              + (", policy forced" if args.force else ""), flush=True)
        result = evaluate(model, spec, evaluated, kernels=args.kernels, force=args.force, calibration=calibration,
                          lowering_kind=lowering, needle=needle, progress=not args.no_progress)
    except NothingRewrittenError as err:
        print(f"sparsecc eval: {err}", file=sys.stderr)
        return EXIT_NOTHING_REWRITTEN
    except SpecError as err:
        print(f"sparsecc eval: spec error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ModelLoadError, ValueError, FileNotFoundError) as err:
        print(f"sparsecc eval: {err}", file=sys.stderr)
        return EXIT_USAGE
    for line in result.lines():
        print(line)
    print(f"report: {result.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
