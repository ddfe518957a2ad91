"""Perplexity of SmolLM2-135M under FFN activation thresholds, tuned against uniform, on held-out text.

    python bench/quality_lm.py [--targets 0.2 0.3 0.4 0.5 0.6] [--gate-targets 0.5] [--mixed-targets 0.4 0.5]
                               [--criterion magnitude] [--rotate] [--fisher-scales]
                               [--ctx 2048] [--windows 2] [--tables bench/quality_lm/tables.json]

Calibration and evaluation use different texts that ship with Python:

* calibration: the standard library's docstrings (``--text docstrings``, :func:`sparsecc.tune.quality.docstrings_text`),
  ``--calib-windows`` windows of ``--calib-ctx`` tokens spread evenly over it; the thresholds' quantiles come from all
  of them, the KL of the sensitivity table and of the blends from ``--search-windows`` of them;
* evaluation: the pydoc topics (``pydoc``), the first ``--windows`` windows of ``--ctx`` tokens, perplexity through
  ``sparsecc.compile`` (reference kernels, eager lowering, policy forced): :func:`sparsecc.tune.quality.evaluate`,
  the function behind ``sparsecc eval``.

For each target, "uniform" gives every projection the same sparsity (the calibration quantile), "tuned" is
``sparsecc.tune``'s separable method on next-token KL (the best measured blend of the separable allocation with
uniform). Specs go to ``--out-dir`` (``sparsecc eval smollm2-135m --spec S --text pydoc --ctx 2048 --windows 2
--force`` reproduces any row), results to ``results.json`` there, the plot to ``bench/plots/quality_smollm2.png``.
``--mixed-targets`` tunes with the mode chosen per site (``sparsecc.tune(mode="mixed")``: both tables, the knapsack's
choice measured beside the input-mode blends; its rows compare with the input-mode rows of the same target).
``--rotate`` first folds one rotation of the residual stream into the model (:mod:`sparsecc.tune.rotation`: the
eigenbasis of the FFN inputs' pooled second moment over the calibration windows), checks that the dense perplexity
did not move, and then tunes and evaluates the rotated model (its specs are for that model only; tables keyed apart;
``--save-rotated DIR`` keeps the rotated model for ``sparsecc eval DIR --spec ...``).
``--fisher-scales`` then folds per-channel Fisher scales of the FFN inputs into the model
(:mod:`sparsecc.tune.channel_scales`, measured on the calibration windows), so that the ``magnitude`` criterion
ranks channels by ``|x_i| sqrt(F_i)``; the dense perplexity is checked again, and the tables are keyed apart.
Sensitivity tables are cached in ``--tables`` (keyed by mode, criterion, levels and calibration), so a rerun only
evaluates. Progress bars on every long step.
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

from sparsecc.spec import Defaults, Spec  # noqa: E402
from sparsecc.tune.capture import ffn_projections, quantile_tau, score_samples  # noqa: E402
from sparsecc.tune.ffn import Sensitivity  # noqa: E402
from sparsecc.tune.models import load_model  # noqa: E402
from sparsecc.tune.prefix import LayerPrefix  # noqa: E402
from sparsecc.tune.quality import evaluate, perplexity, read_texts, token_windows, tokenize  # noqa: E402
from sparsecc.tune.tuner import (FfnSensitivity, blend_mixed, blend_with_uniform, ffn_rules,  # noqa: E402
                                 ffn_sensitivity)

LEVELS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9)


def calibration_windows(tokenizer, count: int, ctx: int):
    """``count`` windows of ``ctx`` tokens spread evenly over the standard library's docstrings."""
    windows = token_windows(tokenize(tokenizer, read_texts("docstrings")), ctx)
    return [windows[int(i * len(windows) / count)] for i in range(count)]


def as_batches(windows):
    return [{"input_ids": w.ids[None], "use_cache": False} for w in windows]


def table_key(mode: str, criterion: str, levels, calib_windows: int, calib_ctx: int, search,
              rotated: bool = False, fisher: bool = False) -> str:
    key = f"{mode}/{criterion}/levels={','.join(map(str, levels))}/calib={calib_windows}x{calib_ctx}/search={search}"
    return key + ("/rotated" if rotated else "") + ("/fisher" if fisher else "")


def sensitivity(model, calib, search, mode, criterion, levels, cache: dict, key: str) -> FfnSensitivity:
    """The sensitivity table of (mode, criterion): from the cache when it holds ``key``, else measured (and cached)."""
    if key not in cache:
        table = ffn_sensitivity(model, calib, levels=levels, criterion=criterion, error_fn="kl",
                                search_batches=search, mode=mode)
        cache[key] = {"seconds": None, "errors": {str(p): list(row) for p, row in table.sensitivity.errors.items()}}
        return table
    import sparsecc
    projections = ffn_projections(model, sparsecc.explain(model, **calib[0]), mode)
    scores = score_samples(model, calib, projections, criterion)
    errors = {p: tuple(cache[key]["errors"][str(p)]) for p in projections}
    dense = LayerPrefix(model, search, []).dense
    return FfnSensitivity(projections, scores, Sensitivity(tuple(levels), errors), criterion, 0, mode,
                          list(search), dense)


def save_model(model, tokenizer, directory: Path) -> None:
    """Config, weights (safetensors) and tokenizer in a directory that ``from_pretrained`` and ``sparsecc eval`` load.

    ``save_pretrained`` refuses a model loaded from a GGUF file (transformers marks it quantised although its weights
    are dequantised float tensors), so the config is written without its GGUF quantisation entry.
    """
    import copy

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


def spec_of(projections, taus, criterion, model=None) -> Spec:
    """A forced spec of these thresholds; for a rotated or channel-scaled model ``[meta.tune]`` names the transform
    (``residual_rotation``, ``ffn_channel_scales``)."""
    from sparsecc.tune.channel_scales import folded_transforms
    record = folded_transforms(model)
    meta = {"tune": {"source": "bench/quality_lm.py", **record}} if record else {}
    return Spec(defaults=Defaults(policy="force"), ffn=tuple(ffn_rules(projections, taus, criterion)), meta=meta)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=float, nargs="*", default=[0.2, 0.3, 0.4, 0.5, 0.6])
    p.add_argument("--gate-targets", type=float, nargs="*", default=[0.5])
    p.add_argument("--mixed-targets", type=float, nargs="*", default=[],
                   help="targets tuned with input or gate mode chosen per site (share of all FFN weights skipped)")
    p.add_argument("--criterion", default="magnitude", choices=("magnitude", "weighted"))
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--calib-ctx", type=int, default=512)
    p.add_argument("--search-windows", type=int, default=1, help="calibration windows the KL is measured on")
    p.add_argument("--tables", type=Path, default=ROOT / "bench" / "quality_lm" / "tables.json")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="specs and results.json (default bench/quality_lm, with --rotate bench/quality_lm/rotated)")
    p.add_argument("--plot", default=None,
                   help="where the plot goes ('' for none; default bench/plots/quality_smollm2.png, none with --rotate)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-eval", action="store_true", help="tune and write the specs only")
    p.add_argument("--rotate", action="store_true",
                   help="fold a residual-stream rotation into the model first (sparsecc.tune.rotation)")
    p.add_argument("--fisher-scales", action="store_true",
                   help="fold per-channel Fisher scales of the FFN inputs into the model (after --rotate)")
    p.add_argument("--save-rotated", type=Path, default=None,
                   help="with --rotate: save the rotated model and tokenizer here (save_pretrained), so that "
                        "`sparsecc eval DIR --spec ...` reproduces a row")
    args = p.parse_args(argv)
    if args.out_dir is None:   # a rotated run never writes over the plain model's specs and results
        args.out_dir = ROOT / "bench" / "quality_lm" / (("rotated" if args.rotate else "")
                                                        + ("_fisher" if args.fisher_scales and args.rotate else
                                                           "fisher" if args.fisher_scales else ""))
    if args.plot is None:
        args.plot = "" if args.rotate or args.fisher_scales else str(ROOT / "bench" / "plots" / "quality_smollm2.png")
    args.out_dir, args.tables = args.out_dir.resolve(), args.tables.resolve()
    torch.set_num_threads(args.threads)
    started = time.time()
    model, tok = load_model("smollm2-135m")
    calib_w = calibration_windows(tok, args.calib_windows, args.calib_ctx)
    calib = as_batches(calib_w)
    # The search windows: evenly among the calibration windows, starting in the middle of the text.
    stride = max(1, args.calib_windows // args.search_windows)
    search = calib[stride // 2::stride][:args.search_windows]
    evaluated = token_windows(tokenize(tok, read_texts("pydoc")), args.ctx, args.windows)
    cache = json.loads(args.tables.read_text()) if args.tables.exists() else {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rotation = None
    if args.rotate:
        from sparsecc.tune.rotation import residual_basis, rotate_residual
        before = perplexity(model, evaluated, desc="dense perplexity, unrotated")
        rotate_residual(model, residual_basis(model, calib))
        rotation = {"unrotated_ppl": before.value}
    elif args.save_rotated is not None:
        p.error("--save-rotated needs --rotate")
    if args.fisher_scales:
        from sparsecc.tune.channel_scales import fisher_channel_scales, scale_ffn_channels
        if rotation is None:
            rotation = {"unrotated_ppl": perplexity(model, evaluated, desc="dense perplexity, unscaled").value}
        t0 = time.time()
        scales = fisher_channel_scales(model, calib)
        scale_ffn_channels(model, scales)
        rotation["fisher_scales"] = {"fingerprint": scales.fingerprint(), "tokens": scales.tokens,
                                     "seconds": round(time.time() - t0)}
    if args.save_rotated is not None:
        save_model(model, tok, args.save_rotated)
    dense = None if args.no_eval and rotation is None else perplexity(model, evaluated, desc="dense perplexity")
    if rotation is not None:
        rotation["rotated_ppl"] = dense.value
        print(f"dense perplexity {rotation['unrotated_ppl']:.6f} before the transforms, {dense.value:.6f} after", flush=True)
        if abs(dense.value / rotation["unrotated_ppl"] - 1) > 1e-4:
            raise SystemExit("quality_lm: the transforms changed the dense perplexity by more than 1e-4")
    results = {"rotation": rotation,
               "dense": None if dense is None else {"ppl": dense.value, "mean_nll": dense.mean_nll,
                                                    "tokens": dense.tokens},
               "calibration": f"docstrings: {args.calib_windows} windows of {args.calib_ctx} tokens, KL on "
                              f"{len(search)}", "evaluation": f"pydoc: {args.windows} windows of {args.ctx} tokens",
               "rows": []}
    runs = [(mode, crit, targets) for mode, crit, targets in (("input", args.criterion, args.targets),
                                                               ("gate", "magnitude", args.gate_targets),
                                                               ("mixed", args.criterion, args.mixed_targets))
            if targets]

    def table(mode, criterion):
        key = table_key(mode, criterion, args.levels, args.calib_windows, args.calib_ctx, len(search), args.rotate,
                        args.fisher_scales)
        t0 = time.time()
        sens = sensitivity(model, calib, search, mode, criterion, args.levels, cache, key)
        if cache[key]["seconds"] is None:
            cache[key]["seconds"] = round(time.time() - t0)
            args.tables.parent.mkdir(parents=True, exist_ok=True)
            args.tables.write_text(json.dumps(cache, indent=1))
        return sens

    for mode, criterion, targets in runs:
        if mode == "mixed":
            sens = table("input", criterion)
            tuning = blend_mixed(model, sens, table("gate", "magnitude"), targets, "kl", 0.95, progress=True)
        else:
            sens = table(mode, criterion)
            tuning = blend_with_uniform(model, sens, targets, "kl", 0.95, progress=True)
        for alloc in tuning.allocations:
            t = alloc.target
            uniform_taus = {q: quantile_tau(sens.scores[q], t) for q in sens.projections}
            row = {"mode": mode, "criterion": criterion, "target": t,
                   "kl": {str(k): v for k, v in tuning.candidates[t].items()},
                   "levels": {str(q): round(v, 4) for q, v in alloc.levels.items() if v > 0 or mode != "mixed"}}
            named = [("uniform", sens.projections, uniform_taus), ("tuned", tuning.projections, alloc.taus)]
            if mode == "mixed":
                # The uniform baseline is input mode's (the input-mode rows); the choice's modes are recorded.
                chosen = list(tuning.modes[t].values())
                row["modes_chosen"] = {m: chosen.count(m) for m in sorted(set(chosen))}
                row["picked_gate_sites"] = sorted(site for site, m in alloc.modes.items() if m == "gate")
                named = named[1:]
            for name, projections, taus in named:
                spec = spec_of(projections, taus, criterion, model)
                path = args.out_dir / f"{mode}_{criterion}_{int(round(100 * t))}_{name}.toml"
                spec.save(path)
                row[f"{name}_spec"] = str(path.relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path)
                if args.no_eval:
                    continue
                result = evaluate(model, spec, evaluated, force=True, lowering_kind="eager", dense=dense)
                row[name] = {"ppl": result.sparse.value, "change": result.relative_change,
                             "rewritten": result.rewritten.get("ffn", 0)}
                print(f"{mode} {criterion} {t:.2f} {name}: ppl {result.sparse.value:.4f} "
                      f"({100 * result.relative_change:+.2f}%), ffn sites {result.rewritten.get('ffn', 0)}",
                      flush=True)
            results["rows"].append(row)
            (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    results["seconds"] = round(time.time() - started)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    if not args.no_eval and args.plot:
        plot(results, Path(args.plot))


def plot(results, path: Path) -> None:
    """Perplexity change vs average FFN sparsity, tuned and uniform, input mode and gate mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, marker in (("input", "o"), ("gate", "s")):
        rows = [r for r in results["rows"] if r["mode"] == mode and "tuned" in r]
        if not rows:
            continue
        xs = [100 * r["target"] for r in rows]
        for name, style in (("uniform", "--"), ("tuned", "-")):
            ax.plot(xs, [100 * r[name]["change"] for r in rows], style + marker, label=f"{name}, {mode} mode")
    ax.plot([40, 50], [5, 15], "k*", markersize=11, label="targets (input mode)")
    ax.plot([50], [10], "kx", markersize=9, label="target (gate mode)")
    ax.set_xlabel("average FFN activation sparsity (%)")
    ax.set_ylabel("perplexity change vs dense (%)")
    ax.set_yscale("log")
    rotated = ", residual stream rotated" if results.get("rotation") else ""
    ax.set_title(f"SmolLM2-135M{rotated}, pydoc topics (held out), ctx 2048")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
