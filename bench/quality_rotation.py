"""Does thresholding the FFN input in a rotated basis (LaRoSA's idea) pay on SmolLM2, and at equal weight bytes?

    python bench/quality_rotation.py [--levels 0.2,0.3,0.4,0.5,0.6] [--variants plain,layer,global,plain_topk,global_topk]
                                     [--json out.json]

Only the gate/up input is thresholded (the down projection stays dense), with one quantile threshold per layer
taken from the calibration inputs, in three bases:

* ``plain``: the input ``x`` itself (TEAL's input mode, uniform level);
* ``layer``: ``z = x Q_l``, ``Q_l`` the eigenvectors of layer l's calibration second-moment matrix ``E[x xᵀ]``; the
  thresholded ``z`` goes back through ``Q_lᵀ`` (what rotated gate/up weights ``W Q_l`` compute). A decode step then
  reads ``Q_l`` (d x d) on top of the kept weight rows: d / (3 d_ff) of the FFN's bytes (12.5% on SmolLM2), so at
  equal bytes it competes with ``plain`` at a level lower by 3/2 of that share (18.75 points here);
* ``global``: one ``Q`` for every layer, the eigenvectors of the pooled second moment of the RMSNorm outputs before
  their scale (``x / g``): the rotation that can be folded into the residual stream (every weight reading or writing
  it rotated once, the norms' scales folded into the readers), so it costs no bytes at decode.

The forwards are patched with plain PyTorch hooks: this measures the idea, it is not a sparsecc form. Calibration:
8 windows of 512 tokens of the standard library's docstrings, spread over it; evaluation: the pydoc topics, the first
2 windows of 2048 tokens (bench/quality_lm.py's held-out text). Printed per level and variant: perplexity and its
change against dense.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("plain", "layer", "global", "plain_topk", "global_topk")


def ffn_inputs(model, windows) -> dict:
    """Every layer's FFN input over ``windows`` (float64 [tokens, d])."""
    layers = model.model.layers
    got = {i: [] for i in range(len(layers))}

    def grab(i):
        def pre(_module, args):
            got[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        return pre

    hooks = [layer.mlp.register_forward_pre_hook(grab(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=w.ids[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in got.items()}


def eigenbasis(second_moment: torch.Tensor) -> torch.Tensor:
    """Orthogonal eigenvectors (columns, float32) of a symmetric second-moment matrix."""
    return torch.linalg.eigh(second_moment)[1].float()


def thresholds(inputs: dict, bases: dict, scales: dict, level: float) -> dict:
    """Per layer, the ``level`` quantile of |(x / scale) Q| over the calibration inputs (every 7th entry)."""
    return {i: torch.quantile(((x.float() / scales[i]) @ bases[i]).abs().flatten()[::7], level).item()
            for i, x in inputs.items()}


def patched_perplexity(model, windows, bases: dict, scales: dict, tau: dict, keep_per_token: int = 0) -> float:
    """Perplexity with each FFN input replaced by ``((z * [|z| > tau]) Qᵀ) * scale``, ``z = (x / scale) Q``.

    With ``keep_per_token`` > 0 each token keeps its ``keep_per_token`` largest ``|z|`` instead (``tau`` unused).
    """
    from sparsecc.tune.quality import perplexity

    def hook(i):
        def pre(_module, args):
            z = (args[0] / scales[i]) @ bases[i]
            if keep_per_token:
                kth = z.abs().topk(keep_per_token, dim=-1).values[..., -1:]
                keep = z.abs() >= kth
            else:
                keep = z.abs() > tau[i]
            return (((z * keep) @ bases[i].T) * scales[i],)
        return pre

    hooks = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        return perplexity(model, windows, progress=False).value
    finally:
        for h in hooks:
            h.remove()


def main(argv=None) -> int:
    from sparsecc.tune.models import load_model
    from sparsecc.tune.quality import perplexity, read_texts, token_windows, tokenize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="0.2,0.3,0.4,0.5,0.6", help="comma-separated gate/up input sparsities")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not allowed; expected names from {VARIANTS}")
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    layers = model.model.layers
    calib_all = token_windows(tokenize(tok, read_texts("docstrings")), 512)
    calib = [calib_all[int(i * len(calib_all) / 8)] for i in range(8)]
    evaluation = token_windows(tokenize(tok, read_texts("pydoc")), 2048, 2)
    inputs = ffn_inputs(model, calib)
    d = next(iter(inputs.values())).shape[1]
    ones = {i: torch.ones(d) for i in inputs}
    norm_scales = {i: layer.post_attention_layernorm.weight.detach().float() for i, layer in enumerate(layers)}
    pooled = sum((x / norm_scales[i].double()).T @ (x / norm_scales[i].double()) for i, x in inputs.items())
    global_basis = eigenbasis(pooled)
    setups = {
        "plain": ({i: torch.eye(d) for i in inputs}, ones),
        "layer": ({i: eigenbasis(x.T @ x) for i, x in inputs.items()}, ones),
        "global": ({i: global_basis for i in inputs}, norm_scales),
    }
    setups["plain_topk"], setups["global_topk"] = setups["plain"], setups["global"]
    d_ff = layers[0].mlp.gate_proj.weight.shape[0]
    dense = perplexity(model, evaluation, progress=False).value
    rows = []
    print(f"dense perplexity {dense:.4f}; d {d}, d_ff {d_ff}: a per-layer rotation is {d / (3 * d_ff):.1%} of the "
          "FFN's weight bytes", flush=True)
    for level in [float(s) for s in args.levels.split(",")]:
        for v in variants:
            bases, scales = setups[v]
            if v.endswith("_topk"):
                value = patched_perplexity(model, evaluation, bases, scales, {}, round((1 - level) * d))
            else:
                value = patched_perplexity(model, evaluation, bases, scales, thresholds(inputs, bases, scales, level))
            rows.append({"level": level, "variant": v, "perplexity": value, "change": value / dense - 1})
            print(f"gate/up input {level:.0%} {v:>6}: {value:.4f} ({(value / dense - 1) * 100:+.2f}%)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"dense": dense, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
