"""Per-head attention tune of SmolLM2-135M at long context: perplexity and needle retrieval, tuned against uniform.

    python bench/quality_attention.py [--ctx 8192] [--budget 0.25] [--judge recall|kl|retrieval|min_mass] [--calib-windows 1]
                                      [--windows 1] [--needle 50] [--kl-windows 256,512,1024,2048]
                                      [--kl-topk 2,6,14] [--kl-rows 16] [--kl-groups layer|kv] [--retrieval-trials 8]
                                      [--retrieval-coverage 0.85] [--kl-hold-retrieval] [--out-dir bench/quality_lm/attention]

* calibration: ``--calib-windows`` windows of ``--ctx`` tokens spread over the standard library's docstrings;
  ``--judge recall`` (default): :func:`sparsecc.tune.attention.record_attention` with the default candidates, then
  :func:`~sparsecc.tune.attention.choose_heads` at mean density ``--budget``; ``--judge kl``:
  :func:`sparsecc.tune.attention_kl.tune_by_kl` (next-token KL per layer, or per KV-head group with
  ``--kl-groups kv``, of dense, sink-64 streaming with the ``--kl-windows`` windows and, with ``--kl-topk``,
  ``block_topk`` on 64-blocks (sink 1, local 1, those topk counts, mean-pooled or, with ``--kl-rows``, the
  sampled-row estimate; per layer only); the exact knapsack; uniform
  kept when it measures no worse on the calibration window); its table is saved after every run
  (``kl_table_<ctx>_<groups>.json``), so a stopped run continues;
  ``--judge retrieval``: :mod:`sparsecc.tune.retrieval`: the heads' retrieval scores on ``--retrieval-trials``
  needle trials over the docstrings (seed 1; cached as ``retrieval_scores_<ctx>_<trials>.pt``), the fewest top
  heads holding ``--retrieval-coverage`` of the scores dense, every other head sink-64 streaming with the widest
  window the budget holds; ``--judge kl --kl-hold-retrieval`` holds those heads dense inside the KL judge, which
  chooses the other heads' forms per layer;
  ``--judge min_mass``: :func:`sparsecc.tune.min_mass.calibrate_min_mass`: one ``block_topk`` rule with a shared
  ``min_mass`` threshold (64-blocks, sink 1, local 1, ``--kl-rows`` sampled rows, default 16) on every head, the
  smallest threshold of its grid whose block density on the calibration windows is at most ``--budget``;
* density is counted in blocks of 64 x 64 (the tuner's ``density_block``): a block is kept when any of its
  causally allowed entries is kept; the tuned spec's is what the calibration recorded (dense heads count 1);
* uniform: one ``streaming`` rule, sink 64, on every head, with the largest window whose block density is at most
  the tuned spec's;
* evaluation (text the tuner never saw): the pydoc topics, ``--windows`` windows of ``--ctx`` tokens, through
  :func:`sparsecc.tune.quality.evaluate` (reference kernels, eager lowering, policy forced), and ``--needle``
  needle-retrieval trials of ``--ctx`` tokens over the pydoc topics (:mod:`sparsecc.tune.needle`), dense and tuned.

Statistics are cached in ``--out-dir`` (``stats_<ctx>.pt``), so a rerun with another budget only evaluates. The
specs and ``results_<ctx>.json`` go there too; progress bars on every long step.
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

from sparsecc.forms import BlockTopK, Dense, Streaming  # noqa: E402
from sparsecc.spec import Defaults, Rule, Spec  # noqa: E402
from sparsecc.tune.attention import DENSITY_BLOCK as BLOCK, AttentionStats, choose_heads, record_attention  # noqa: E402
from sparsecc.tune.attention_kl import (UNIFORM_SINK, default_kl_candidates, streaming_block_density,  # noqa: E402
                                        tune_by_kl, uniform_window)
from sparsecc.tune.models import load_model  # noqa: E402
from sparsecc.tune.needle import needle_check, needle_trials  # noqa: E402
from sparsecc.tune.retrieval import retrieval_heads, retrieval_scores, split_forms  # noqa: E402
from sparsecc.tune.quality import evaluate, perplexity, read_texts, token_windows, tokenize  # noqa: E402
from sparsecc.tune.tuner import attention_rules  # noqa: E402

JUDGES = ("recall", "kl", "retrieval", "min_mass")


def load_stats(path: Path) -> AttentionStats:
    stats = AttentionStats()
    stats.sites = torch.load(path, weights_only=False)
    return stats


def retrieval_scores_cached(model, tok, args, out: Path) -> torch.Tensor:
    """Retrieval scores on ``--retrieval-trials`` needle trials over the docstrings (seed 1), cached in ``out``; a
    cached file is used only when everything the scores depend on besides the model matches."""
    path = out / f"retrieval_scores_{args.ctx}_{args.retrieval_trials}.pt"
    scored_on = {"ctx": args.ctx, "trials": args.retrieval_trials, "seed": 1, "text": "docstrings",
                 "span": "value tokens", "rows": "answer-predicting"}
    cached = torch.load(path) if path.exists() else None
    if cached is not None and cached.get("scored_on") == scored_on:
        return cached["scores"]
    trials = needle_trials(tok, read_texts("docstrings"), args.ctx, args.retrieval_trials, seed=1)
    scores = retrieval_scores(model, trials)
    torch.save({"scores": scores, "scored_on": scored_on}, path)
    return scores


def retrieval_evidence(heads, scores: torch.Tensor, args, **split) -> dict:
    """The results file's ``retrieval`` entry: the dense heads, how they were chosen, the scores, and (retrieval
    judge) the streaming rule of the other heads."""
    return {"heads": [list(x) for x in heads], "coverage": args.retrieval_coverage,
            "calibration_trials": args.retrieval_trials, **split, "scores": scores.tolist()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--budget", type=float, default=0.25, help="mean density budget of the head choice")
    p.add_argument("--calib-windows", type=int, default=1)
    p.add_argument("--windows", type=int, default=1, help="evaluated pydoc windows")
    p.add_argument("--needle", type=int, default=50, help="needle trials (0: none)")
    p.add_argument("--judge", default="recall", help=f"how head forms are chosen: one of {JUDGES}")
    p.add_argument("--kl-windows", default=None,
                   help="--judge kl: comma-separated sink-64 streaming windows (default ctx/32, ctx/16, ctx/8, ctx/4)")
    p.add_argument("--kl-topk", default=None,
                   help="--judge kl: comma-separated topk counts of block_topk candidates (64-blocks, sink 1, local 1)")
    p.add_argument("--kl-rows", type=int, default=None,
                   help="--judge kl: the --kl-topk candidates use the sampled-row estimate with this many rows "
                        "(pool = \"rows\"; default: mean pooling)")
    p.add_argument("--kl-groups", default="layer", help="--judge kl: 'layer' or 'kv' (one group per KV head)")
    p.add_argument("--retrieval-trials", type=int, default=8,
                   help="--judge retrieval: needle trials over the docstrings (seed 1) that score the heads")
    p.add_argument("--retrieval-coverage", type=float, default=0.85,
                   help="--judge retrieval: dense heads = the fewest top heads holding this share of the scores")
    p.add_argument("--kl-hold-retrieval", action="store_true",
                   help="--judge kl: hold the retrieval heads (--retrieval-coverage) dense; the KL judge chooses the "
                        "other heads' forms per layer")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "quality_lm" / "attention"))
    args = p.parse_args(argv)
    if args.judge not in JUDGES:
        p.error(f"--judge {args.judge!r} is not allowed; expected one of {JUDGES}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    started = time.time()

    calib_all = token_windows(tokenize(tok, read_texts("docstrings")), args.ctx)
    calib = [calib_all[int(i * len(calib_all) / args.calib_windows)] for i in range(args.calib_windows)]
    suffix = f"{args.ctx}_{args.budget}" + {"kl": "_kl", "retrieval": "_retrieval",
                                            "min_mass": f"_min_mass_rows{args.kl_rows or 16}"}.get(args.judge, "")
    kl_info = retrieval_info = min_mass_info = None
    if args.judge == "min_mass":
        from sparsecc.tune.attention import HeadChoice
        from sparsecc.tune.min_mass import calibrate_min_mass
        t0 = time.time()
        calibration = calibrate_min_mass(model, [{"input_ids": w.ids[None], "use_cache": False} for w in calib],
                                         args.budget, block=BLOCK, rows=args.kl_rows or 16)
        min_mass_info = {"min_mass": calibration.min_mass, "densities": calibration.densities,
                         "seconds": round(time.time() - t0)}
        print("min_mass calibration (threshold, block density): "
              + ", ".join(f"{t:g}: {d:.4f}" for t, d in calibration.densities), flush=True)
        if calibration.form is None:
            raise SystemExit(f"no min_mass threshold of the grid keeps at most {args.budget} of the blocks")
        density = dict(calibration.densities)[calibration.min_mass]
        heads = model.config.num_attention_heads
        choices = [HeadChoice(f"model.layers.{i}.self_attn", [calibration.form] * heads, [float("nan")] * heads,
                              [density] * heads) for i in range(model.config.num_hidden_layers)]
    elif args.judge == "retrieval":
        scores = retrieval_scores_cached(model, tok, args, out)
        split = split_forms(scores.shape[0], scores.shape[1], retrieval_heads(scores, args.retrieval_coverage),
                            args.ctx, args.budget)
        choices = split.choices
        retrieval_info = retrieval_evidence(split.heads, scores, args, window=split.window, sink=split.sink,
                                            density=split.density)
        print(f"retrieval heads ({len(split.heads)}, coverage {args.retrieval_coverage}): "
              + ", ".join(f"{l}.{h}" for l, h in split.heads)
              + f"; other heads streaming sink {split.sink} window {split.window}", flush=True)
    elif args.judge == "recall":
        stats_path = out / f"stats_{args.ctx}.pt"
        if stats_path.exists():
            stats = load_stats(stats_path)   # recorded by an earlier run with the same --ctx and calibration
        else:
            stats = record_attention(model, [{"input_ids": w.ids[None], "use_cache": False} for w in calib])
            torch.save(stats.sites, stats_path)
        choices = choose_heads(stats, args.budget)
    else:
        candidates = default_kl_candidates(args.ctx)
        if args.kl_windows:
            candidates = [Streaming(UNIFORM_SINK, int(w)) for w in args.kl_windows.split(",")]
        if args.kl_topk:
            estimate = {"pool": "rows", "rows": args.kl_rows} if args.kl_rows else {}
            candidates += [BlockTopK(block=BLOCK, topk=int(k), sink_blocks=1, local_blocks=1, **estimate)
                           for k in args.kl_topk.split(",")]
            suffix += "_topk" + (f"_rows{args.kl_rows}" if args.kl_rows else "")
        held = []
        if args.kl_hold_retrieval:
            scores = retrieval_scores_cached(model, tok, args, out)
            held = retrieval_heads(scores, args.retrieval_coverage)
            retrieval_info = retrieval_evidence(held, scores, args)
            suffix += "_retrieval"
        tuning = tune_by_kl(model, [w.ids for w in calib], args.budget, candidates=candidates,
                            grouping=args.kl_groups, resume=out / f"kl_table_{args.ctx}_{args.kl_groups}.json",
                            dense_heads=held)
        choices = tuning.choices
        kl_info = {"used": tuning.used, "allocation_kl": tuning.allocation_kl,
                   "allocation_density": tuning.allocation_density, "uniform_window": tuning.uniform_window,
                   "uniform_kl": tuning.uniform_kl, "uniform_density": tuning.uniform_density,
                   "uniform_topk": str(tuning.uniform_topk) if tuning.uniform_topk else None,
                   "uniform_topk_kl": tuning.uniform_topk_kl, "uniform_topk_density": tuning.uniform_topk_density,
                   "allocation": {str(l): [str(f) for f in forms] for l, forms in sorted(tuning.allocation.items())},
                   "table": tuning.table.rows(), "runs": tuning.table.runs, "seconds": tuning.seconds,
                   "calibration_minutes": (time.time() - started) / 60}
        print(f"KL judge: allocation KL {tuning.allocation_kl:.5f} at block density {tuning.allocation_density:.4f}; "
              f"uniform window {tuning.uniform_window} KL {tuning.uniform_kl:.5f} at "
              f"{tuning.uniform_density:.4f}"
              + (f"; uniform {tuning.uniform_topk} KL {tuning.uniform_topk_kl:.5f} at {tuning.uniform_topk_density:.4f}"
                 if tuning.uniform_topk else "") + f"; using {tuning.used}", flush=True)
    heads = [(f, r, d) for c in choices for f, r, d in zip(c.forms, c.recall, c.density)]
    tuned_blocks = sum(h[2] for h in heads) / len(heads)
    tuned = Spec(defaults=Defaults(policy="force"), attention=tuple(attention_rules(choices)))
    tuned_path = out / f"tuned_{suffix}.toml"
    tuned.save(tuned_path)
    sparse_sites = sum(1 for c in choices if any(not isinstance(f, Dense) for f in c.forms))
    window = uniform_window(tuned_blocks, args.ctx, BLOCK)
    uniform = Spec(defaults=Defaults(policy="force"), attention=(
        Rule(kind="attention", index=0, form=Streaming(UNIFORM_SINK, window), modules="model.layers.*.self_attn"),))
    uniform_path = out / f"uniform_{args.ctx}_{window}.toml"
    uniform.save(uniform_path)
    specs = [("tuned", tuned_path, sparse_sites), ("uniform", uniform_path, len(choices))]
    uniform_blocks = streaming_block_density(Streaming(UNIFORM_SINK, window), args.ctx, BLOCK)
    densities = {"tuned": tuned_blocks, "uniform": uniform_blocks}
    topk_form = tuning.uniform_topk if kl_info is not None else None
    if topk_form is not None:   # the uniform block_topk rule the KL judge compared with
        uniform_topk = Spec(defaults=Defaults(policy="force"), attention=(
            Rule(kind="attention", index=0, form=topk_form, modules="model.layers.*.self_attn"),))
        rows = f"_rows{topk_form.rows}" if topk_form.pool == "rows" else ""
        topk_path = out / f"uniform_topk_{args.ctx}_{topk_form.topk}{rows}.toml"
        uniform_topk.save(topk_path)
        specs.append(("uniform_topk", topk_path, len(choices)))
        densities["uniform_topk"] = tuning.uniform_topk_density
    forms: dict = {}
    for f, *_ in heads:
        forms[str(f)] = forms.get(str(f), 0) + 1
    recall = (f", mean recall {sum(h[1] for h in heads) / len(heads):.4f}" if args.judge == "recall" else "")
    print(f"tuned at budget {args.budget}: mean block density {tuned_blocks:.4f}{recall}; uniform window {window} "
          f"(block density {uniform_blocks:.4f})", flush=True)
    print("head forms:", json.dumps(dict(sorted(forms.items(), key=lambda kv: -kv[1]))), flush=True)
    if kl_info is not None:
        print("layer forms:", ", ".join(f"{i}:{c.forms[0] if len(set(map(str, c.forms))) == 1 else c.forms}"
                                        for i, c in enumerate(choices)), flush=True)

    text = read_texts("pydoc")
    windows = token_windows(tokenize(tok, text), args.ctx, args.windows)
    trials = needle_trials(tok, text, args.ctx, args.needle, seed=0) if args.needle else []
    dense = None

    def save():   # after every step: a stopped run keeps what it measured
        result = {"ctx": args.ctx, "budget": args.budget, "judge": args.judge, "block": BLOCK,
                  "windows": args.windows, "scored_tokens": dense.tokens if dense else None,
                  "dense_perplexity": dense.value if dense else None, "tuned_block_density": tuned_blocks,
                  "uniform_window": window, "head_forms": forms, "rows": rows, "kl": kl_info,
                  "retrieval": retrieval_info, "min_mass": min_mass_info,
                  "minutes": (time.time() - started) / 60}
        (out / f"results_{suffix}.json").write_text(json.dumps(result, indent=1))

    rows: dict = {}
    save()   # the choice (and the KL table) before the evaluation
    dense = perplexity(model, windows, desc="dense perplexity")
    save()
    for name, path, expected in specs:
        if name != "tuned" and kl_info is not None and kl_info["used"] == name:
            rows[name] = dict(rows["tuned"], spec=str(path), note="the KL judge returned this uniform rule")
            save()
            continue
        ev = evaluate(model, str(path), windows, kernels="reference", lowering_kind="eager", dense=dense)
        rows[name] = {"spec": str(path), "perplexity": ev.sparse.value, "change": ev.relative_change,
                      "rewritten": ev.rewritten, "sites": ev.sites, "expected_rewritten": expected,
                      "report": ev.summary}
        if ev.rewritten.get("attention", 0) != expected:   # every site with a sparse head must be rewritten
            save()
            raise SystemExit(f"{name}: {ev.rewritten.get('attention', 0)} attention sites rewritten, expected "
                             f"{expected} (the sites with a sparse head): {ev.summary}")
        print(name, *ev.lines(), sep="\n  ", flush=True)
        save()
    if trials:
        # Needle trials after the perplexities (they take most of the time): dense, then the tuned spec compiled
        # as evaluate() compiles it.
        import sparsecc
        from sparsecc.tune.quality import forced, lowering
        rows["tuned"]["needle_dense"] = needle_check(model, trials, desc="dense needle").hits
        save()
        torch._dynamo.reset()
        with lowering("eager"):
            compiled = sparsecc.compile(model, spec=forced(tuned), kernels="reference")
            rows["tuned"]["needle_sparse"] = needle_check(compiled, trials, desc="tuned needle").hits
        save()
        torch._dynamo.reset()
    print("\n| spec | block density | perplexity | vs dense | needle |\n|---|---|---|---|---|")
    print(f"| dense | 1.0 | {dense.value:.4f} | | "
          f"{sum(rows['tuned'].get('needle_dense', [])) if trials else '-'}/{len(trials)} |")
    for name in rows:
        r = rows[name]
        density = densities[name]
        needle = f"{sum(r['needle_sparse'])}/{len(trials)}" if "needle_sparse" in r else "-"
        print(f"| {name} | {density:.4f} | {r['perplexity']:.4f} | {100 * r['change']:+.2f}% | {needle} |")


if __name__ == "__main__":
    main()
