"""Per-head attention tune of SmolLM2-135M at long context: perplexity and needle retrieval, tuned against uniform.

    python bench/quality_attention.py [--ctx 8192] [--budget 0.25] [--calib-windows 1] [--windows 1] [--needle 50]
                                      [--out-dir bench/quality_lm/attention]

* calibration: ``--calib-windows`` windows of ``--ctx`` tokens spread over the standard library's docstrings;
  :func:`sparsecc.tune.attention.record_attention` with the default candidates, then
  :func:`~sparsecc.tune.attention.choose_heads` at mean density ``--budget``;
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
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparsecc.forms import Streaming  # noqa: E402
from sparsecc.spec import Defaults, Rule, Spec  # noqa: E402
from sparsecc.tune.attention import (DENSITY_BLOCK as BLOCK, AttentionStats, any_blocks, choose_heads,  # noqa: E402
                                     record_attention, streaming_mask)
from sparsecc.tune.models import load_model  # noqa: E402
from sparsecc.tune.needle import needle_check, needle_trials  # noqa: E402
from sparsecc.tune.quality import evaluate, perplexity, read_texts, token_windows, tokenize  # noqa: E402
from sparsecc.tune.tuner import attention_rules  # noqa: E402

UNIFORM_SINK = 64


def streaming_block_density(form: Streaming, ctx: int, block: int) -> float:
    """Kept blocks / causal blocks of a streaming form over a ctx x ctx causal grid."""
    n = math.ceil(ctx / block)
    return float(any_blocks(streaming_mask(form, ctx, ctx, True, "cpu"), block).sum()) / (n * (n + 1) // 2)


def uniform_window(target: float, ctx: int, block: int) -> int:
    """The largest window (a multiple of 16) whose sink-64 streaming block density is at most ``target``."""
    lo, hi = 16, ctx
    while hi - lo > 16:
        mid = (lo + hi) // 32 * 16
        if streaming_block_density(Streaming(UNIFORM_SINK, mid), ctx, block) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def load_stats(path: Path) -> AttentionStats:
    stats = AttentionStats()
    stats.sites = torch.load(path, weights_only=False)
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--budget", type=float, default=0.25, help="mean density budget of the head choice")
    p.add_argument("--calib-windows", type=int, default=1)
    p.add_argument("--windows", type=int, default=1, help="evaluated pydoc windows")
    p.add_argument("--needle", type=int, default=50, help="needle trials (0: none)")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "quality_lm" / "attention"))
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    started = time.time()

    stats_path = out / f"stats_{args.ctx}.pt"
    if stats_path.exists():
        stats = load_stats(stats_path)   # recorded by an earlier run with the same --ctx and calibration
    else:
        calib_all = token_windows(tokenize(tok, read_texts("docstrings")), args.ctx)
        calib = [calib_all[int(i * len(calib_all) / args.calib_windows)] for i in range(args.calib_windows)]
        stats = record_attention(model, [{"input_ids": w.ids[None], "use_cache": False} for w in calib])
        torch.save(stats.sites, stats_path)
    choices = choose_heads(stats, args.budget)
    heads = [(f, r, d) for c in choices for f, r, d in zip(c.forms, c.recall, c.density)]
    tuned_blocks = sum(h[2] for h in heads) / len(heads)
    tuned = Spec(defaults=Defaults(policy="force"), attention=tuple(attention_rules(choices)))
    tuned_path = out / f"tuned_{args.ctx}_{args.budget}.toml"
    tuned.save(tuned_path)
    window = uniform_window(tuned_blocks, args.ctx, BLOCK)
    uniform = Spec(defaults=Defaults(policy="force"), attention=(
        Rule(kind="attention", index=0, form=Streaming(UNIFORM_SINK, window), modules="model.layers.*.self_attn"),))
    uniform_path = out / f"uniform_{args.ctx}_{window}.toml"
    uniform.save(uniform_path)
    forms: dict = {}
    for f, *_ in heads:
        forms[str(f)] = forms.get(str(f), 0) + 1
    uniform_blocks = streaming_block_density(Streaming(UNIFORM_SINK, window), args.ctx, BLOCK)
    print(f"tuned at budget {args.budget}: mean block density {tuned_blocks:.4f}, mean recall "
          f"{sum(h[1] for h in heads) / len(heads):.4f}; uniform window {window} (block density "
          f"{uniform_blocks:.4f})", flush=True)
    print("head forms:", json.dumps(dict(sorted(forms.items(), key=lambda kv: -kv[1]))), flush=True)

    text = read_texts("pydoc")
    windows = token_windows(tokenize(tok, text), args.ctx, args.windows)
    trials = needle_trials(tok, text, args.ctx, args.needle, seed=0) if args.needle else []
    dense = perplexity(model, windows, desc="dense perplexity")

    def save():   # after every step: a stopped run keeps what it measured
        result = {"ctx": args.ctx, "budget": args.budget, "block": BLOCK, "windows": args.windows,
                  "scored_tokens": dense.tokens, "dense_perplexity": dense.value, "tuned_block_density": tuned_blocks,
                  "uniform_window": window, "head_forms": forms, "rows": rows,
                  "minutes": (time.time() - started) / 60}
        (out / f"results_{args.ctx}_{args.budget}.json").write_text(json.dumps(result, indent=1))

    rows: dict = {}
    for name, path in (("tuned", tuned_path), ("uniform", uniform_path)):
        ev = evaluate(model, str(path), windows, kernels="reference", lowering_kind="eager", dense=dense)
        rows[name] = {"spec": str(path), "perplexity": ev.sparse.value, "change": ev.relative_change,
                      "rewritten": ev.rewritten, "report": ev.summary}
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
    print(f"\n| spec | block density | perplexity | vs dense | needle |\n|---|---|---|---|---|")
    print(f"| dense | 1.0 | {dense.value:.4f} | | "
          f"{sum(rows['tuned'].get('needle_dense', [])) if trials else '-'}/{len(trials)} |")
    for name in rows:
        r = rows[name]
        density = tuned_blocks if name == "tuned" else uniform_blocks
        needle = f"{sum(r['needle_sparse'])}/{len(trials)}" if "needle_sparse" in r else "-"
        print(f"| {name} | {density:.4f} | {r['perplexity']:.4f} | {100 * r['change']:+.2f}% | {needle} |")


if __name__ == "__main__":
    main()
