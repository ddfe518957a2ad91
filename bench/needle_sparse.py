"""Needle retrieval through a compiled model only, trial by trial, for comparison with a dense run of the same trials.

    python bench/needle_sparse.py --spec SPEC|--dense [--model smollm2-135m] [--ctx 8192] [--trials 50] [--seed 0]
                                  [--text pydoc] [--json out.json [--resume]]

``sparsecc eval --needle N`` runs the same trials through the dense model first; at 8K tokens on a 2-core CPU that
is about an hour per side. When the dense rate of the same trials (same text, ``ctx``, trial count and seed) is
already known, this runs only the compiled side, with the policy forced, reference kernels on CPU (the kernels on
CUDA) and eager lowering on CPU, as ``sparsecc eval`` does. It prints each trial's depth and result as it goes and
writes them (with the compiled report's site counts) to ``--json``, so a run stopped early keeps its partial rate.
``--dense`` runs the same trials through the model itself, uncompiled, and records them the same way (the dense
side trial by trial, to match against a compiled run's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import sparsecc
    from sparsecc.backend import reset_reports
    from sparsecc.spec import load_spec
    from sparsecc.tune.evalcli import load
    from sparsecc.tune.needle import needle_check, needle_trials
    from sparsecc.tune.quality import default_kernels, forced, lowering, read_texts, site_counts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side = p.add_mutually_exclusive_group(required=True)
    side.add_argument("--spec", help="the spec to compile the model with")
    side.add_argument("--dense", action="store_true", help="run the model itself, uncompiled")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", nargs="+", default=["pydoc"])
    p.add_argument("--json", help="write per-trial results here (rewritten after every trial)")
    p.add_argument("--resume", action="store_true", help="keep the trials already in --json and run the rest")
    args = p.parse_args(argv)
    rows = _resumed_rows(args) if args.resume else []

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(args.model, device=device)
    trials = needle_trials(tokenizer, read_texts(args.text), args.ctx, args.trials, seed=args.seed)
    spec = None if args.dense else forced(load_spec(args.spec))
    torch._dynamo.reset()
    reset_reports()
    counts, started, skip = [], [time.time()], len(rows)
    if skip >= len(trials):
        print(f"needle_sparse: {args.json} already holds all {len(trials)} trials: "
              f"{sum(r['hit'] for r in rows)}/{len(rows)} hits")
        return 0

    def on_trial(i, trial, hit):
        i += skip
        if args.dense and not counts:
            counts.extend([{}, {}])
        if not counts:
            counts.extend(site_counts(sparsecc.last_report()))
            if not counts[0]:
                raise SystemExit(f"needle_sparse: the spec rewrote no site ({sparsecc.last_report().summary()})")
        rows.append({"trial": i, "depth": round(trial.depth, 4), "value": trial.value, "hit": hit,
                     "seconds": round(time.time() - started[0], 1)})
        started[0] = time.time()
        hits = sum(r["hit"] for r in rows)
        print(f"trial {i:3d} depth {trial.depth:.3f} {'hit ' if hit else 'miss'}  hits {hits}/{len(rows)}  "
              f"({rows[-1]['seconds']} s)", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "spec": "dense" if args.dense else args.spec, "model": args.model, "ctx": args.ctx, "trials": args.trials,
                "seed": args.seed, "text": args.text, **_spec_digest(args),
                "sites_rewritten": counts[0], "sites_found": counts[1],
                "hits": hits, "done": len(rows), "rows": rows}, indent=1))

    if args.dense:
        needle_check(model, trials[skip:], progress=False, on_trial=on_trial)
        print(f"needle exact match, dense: {sum(r['hit'] for r in rows)}/{len(rows)}")
        return 0
    with lowering("inductor" if device.type == "cuda" else "eager"):
        compiled = sparsecc.compile(model, spec=spec, kernels=default_kernels(model))
        needle_check(compiled, trials[skip:], progress=False, on_trial=on_trial)
    rewritten = ", ".join(f"{family} {n}/{counts[1].get(family, n)}" for family, n in sorted(counts[0].items()))
    print(f"needle exact match, compiled: {sum(r['hit'] for r in rows)}/{len(rows)} (sites rewritten: {rewritten})")
    return 0


def _spec_digest(args) -> dict:
    """``{"spec_sha256": ...}`` of the spec file's bytes (nothing for ``--dense``): a resumed run checks the contents."""
    if args.dense:
        return {}
    import hashlib
    return {"spec_sha256": hashlib.sha256(Path(args.spec).read_bytes()).hexdigest()}


def _resumed_rows(args) -> list[dict]:
    """The rows of an earlier run's ``--json``, after checking it ran the same trials with the same model and spec."""
    if not args.json:
        raise SystemExit("needle_sparse: --resume needs --json (the file to resume)")
    path = Path(args.json)
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    wanted = {"spec": "dense" if args.dense else args.spec, "model": args.model, "ctx": args.ctx,
              "trials": args.trials, "seed": args.seed, "text": args.text}
    wanted.update({k: v for k, v in _spec_digest(args).items() if k in earlier})   # files before the digest: by path
    differs = {k: (earlier.get(k), v) for k, v in wanted.items() if earlier.get(k) != v}
    if differs:
        raise SystemExit(f"needle_sparse: {path} was written for other settings (file, now): {differs}")
    rows = earlier["rows"]
    if [r["trial"] for r in rows] != list(range(len(rows))):
        raise SystemExit(f"needle_sparse: {path} does not hold trials 0..{len(rows) - 1} in order")
    return rows


if __name__ == "__main__":
    sys.exit(main())
