"""One orthogonal rotation of a decoder's residual stream, folded into its weights (FFN thresholds in a new basis).

A pre-norm decoder's FFN input is ``RMSNorm(h) = g * h / rms(h)``. An orthogonal ``Q`` keeps the norm of every
row, so ``rms(h Q) = rms(h)``: a model whose residual stream carries ``h Q`` instead of ``h`` computes the same
function when

* every weight that **writes** the stream writes ``h Q``: the token embedding ``E Q``, the attention output and FFN
  down projections ``Qᵀ W`` (and a bias ``b Q``);
* every norm's scale ``g`` moves into the weights that **read** its output, which also undo ``Q``: ``W diag(g) Q``
  for q/k/v, gate/up and the LM head; the norms keep scale 1;
* a tied embedding and LM head are untied (the head reads ``diag(g_final) Q``, the embedding writes ``Q``).

The logits are unchanged up to rounding (``tests/tune/test_rotation.py`` compares float64 logits before and
after). What changes is the FFN input the activation thresholds see: ``(h / rms(h)) Q``. With
``Q`` the eigenvectors of that input's second moment pooled over every layer (:func:`residual_basis`), a few
coordinates carry most of the energy, and a magnitude threshold in that basis drops less of the output than one on
the plain input at the same sparsity (LaRoSA, Liu et al., ICML 2025, rotates per layer; one shared rotation costs
nothing per decode step once folded; docs/tune.md, docs/quality.md).

Llama-style decoders (transformers' ``LlamaForCausalLM`` layout: ``model.embed_tokens``, ``model.layers[i]`` with
``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``, then
``model.norm`` and ``lm_head``, RMS norms) only; anything else is refused with the module that does not fit. The
fold is then checked on probe tokens: logits that moved (a norm that is not ``g * h / rms(h)``, such as Gemma's
``(1 + g)``, or a reader that is more than its weight) restore the model and raise :class:`RotationError`.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

__all__ = ["residual_basis", "rotate_residual", "rotation_fingerprint", "rotation_of", "RotationError",
           "ROTATION_ATTRIBUTE"]

_READERS_ATTN = ("q_proj", "k_proj", "v_proj")
_READERS_FFN = ("gate_proj", "up_proj")
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
# The config attribute a rotated model carries (the rotation's fingerprint): it changes the model's config hash, is
# saved with the config, and a spec tuned on the model records it (``[meta.tune] residual_rotation``).
ROTATION_ATTRIBUTE = "sparsecc_residual_rotation"
# Probe tokens for the check after the fold, and the largest logit change it accepts (relative to the largest logit;
# float32 rounding through a deep stack is ~1e-6 of it, a misfolded norm or reader moves logits by percents).
# float64 gets float32's bound: transformers' RMS norm normalises in float32 whatever the weights' dtype.
_PROBE_TOKENS = 16
_PROBE_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4}
_PROBE_TOLERANCE_LOW = 2e-2   # any float16 / bfloat16 weight among those the fold touches


class RotationError(ValueError):
    """The model does not have the layout the residual rotation folds into, or the fold changed its logits."""


def _fail(model, what: str) -> RotationError:
    return RotationError(f"rotate_residual: {type(model).__name__}: {what} (a Llama-style decoder is needed: "
                         "model.embed_tokens, model.layers[i] with input_layernorm, self_attn.{q,k,v,o}_proj, "
                         "post_attention_layernorm, mlp.{gate,up,down}_proj, then model.norm and lm_head)")


def _parts(model: nn.Module) -> Dict[str, object]:
    """The modules the rotation touches, after checking the layout (RotationError naming what does not fit)."""
    def get(obj, path):
        for name in path.split("."):
            if not hasattr(obj, name):
                raise _fail(model, f"has no '{path}'")
            obj = getattr(obj, name)
        return obj

    embed, layers, final, head = (get(model, p) for p in ("model.embed_tokens", "model.layers", "model.norm",
                                                          "lm_head"))
    if not isinstance(embed, nn.Embedding):
        raise _fail(model, f"model.embed_tokens is a {type(embed).__name__}, not an nn.Embedding")
    d = embed.weight.shape[1]

    def linear(path: str, module, reads: bool) -> None:
        # Exactly nn.Linear: a wrapper (LoRA, quantised) computes more than its .weight, which the fold would miss.
        if type(module) is not nn.Linear:
            raise _fail(model, f"{path} is a {type(module).__name__}, not an nn.Linear")
        width = module.in_features if reads else module.out_features
        if width != d:
            raise _fail(model, f"{path} has {'in' if reads else 'out'}_features {width}, not the hidden size {d}")

    norms = [("model.norm", final)]
    for i, layer in enumerate(layers):
        at = f"model.layers.{i}"
        for name in _READERS_ATTN:
            linear(f"{at}.self_attn.{name}", get(layer, f"self_attn.{name}"), True)
        for name in _READERS_FFN:
            linear(f"{at}.mlp.{name}", get(layer, f"mlp.{name}"), True)
        linear(f"{at}.self_attn.o_proj", get(layer, "self_attn.o_proj"), False)
        linear(f"{at}.mlp.down_proj", get(layer, "mlp.down_proj"), False)
        extra = [n for n, m in layer.named_children() if "norm" in type(m).__name__.lower() and n not in _LAYER_NORMS]
        if extra:
            raise _fail(model, f"{at} has norms besides {_LAYER_NORMS}: {extra}")
        norms += [(f"{at}.{n}", get(layer, n)) for n in _LAYER_NORMS]
    linear("lm_head", head, True)
    for path, norm in norms:
        weight = getattr(norm, "weight", None)
        if "RMSNorm" not in type(norm).__name__ or weight is None or getattr(norm, "bias", None) is not None:
            raise _fail(model, f"{path} is a {type(norm).__name__}, not an RMS norm with a scale and no bias (only "
                               "RMS norms commute with a rotation)")
        if tuple(weight.shape) != (d,):
            raise _fail(model, f"{path} has a scale of shape {tuple(weight.shape)}, not ({d},)")
    return {"embed": embed, "layers": layers, "final": final, "head": head}


def residual_basis(model: nn.Module, batches: Sequence) -> torch.Tensor:
    """The eigenvectors (columns, float64 [d, d], on the CPU) of the FFN inputs' pooled second moment.

    Every layer's ``post_attention_layernorm`` output divided by its scale, over
    the tokens of ``batches`` (a tuple of positional arguments, a dict of
    keyword arguments or a tensor of input ids, as :func:`sparsecc.tune` takes
    them; positions an ``attention_mask`` masks out are left out), summed into
    one ``d x d`` matrix. The model runs in eval mode. Columns in ascending order
    of eigenvalue.
    """
    from sparsecc.tune.capture import run

    parts = _parts(model)
    d = parts["embed"].weight.shape[1]
    moment = torch.zeros(d, d, dtype=torch.float64)
    keep: List = [None]

    def hook(norm):
        def record(_module, _args, out):
            nonlocal moment
            x = out.detach().double() / norm.weight.detach().double()
            if keep[0] is not None and keep[0].shape == x.shape[:-1]:
                x = x[keep[0].to(x.device)]
            x = x.reshape(-1, d)
            moment += (x.T @ x).cpu()
        return record

    handles = [layer.post_attention_layernorm.register_forward_hook(hook(layer.post_attention_layernorm))
               for layer in parts["layers"]]
    states = _training_states(model)
    model.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            keep[0] = None if mask is None else mask.bool()
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
        _restore_training(states)
    if not torch.isfinite(moment).all() or not moment.abs().sum() > 0:
        raise ValueError("residual_basis: the FFN inputs recorded no finite, non-zero values")
    return torch.linalg.eigh(moment)[1]


def rotation_of(model) -> "str | None":
    """The fingerprint of the rotation folded into ``model`` (:data:`ROTATION_ATTRIBUTE` of its config), or None."""
    return getattr(getattr(model, "config", None), ROTATION_ATTRIBUTE, None) or None


def rotation_fingerprint(basis: torch.Tensor) -> str:
    """A short SHA-256 of the rotation (float64 bytes): what a rotated model and its specs record."""
    data = torch.as_tensor(basis).detach().to(torch.float64).cpu().contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]


def _probe_logits(model: nn.Module, vocab: int, device) -> torch.Tensor:
    ids = (torch.arange(_PROBE_TOKENS, device=device) * 7919 % vocab)[None]
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")   # TF32 would move float32 logits by ~1e-3 on its own
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False) if _takes_use_cache(model) else model(input_ids=ids)
    finally:
        torch.set_float32_matmul_precision(precision)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.detach().double().cpu()


def _training_states(model: nn.Module) -> Dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_training(states: Dict[nn.Module, bool]) -> None:
    for module, training in states.items():
        module.training = training


def _takes_use_cache(model) -> bool:
    import inspect
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def rotate_residual(model: nn.Module, basis: torch.Tensor) -> None:
    """Fold the orthogonal ``basis`` (float [d, d]) into ``model``'s weights, in place (see the module docstring).

    Computed in float64 and stored in each weight's dtype. ``basis`` must be
    orthogonal (``basisᵀ basis = I`` to 1e-6). A tied LM head is untied and
    ``config.tie_word_embeddings`` (when present) set to False; the config
    gets :data:`ROTATION_ATTRIBUTE`, the rotation's fingerprint (a second
    rotation is refused). After the fold the logits of 16 probe tokens are
    compared with those before; if they moved (beyond float rounding), or if
    anything fails, every weight is restored and RotationError / the error is
    raised: the model is either rotated or unchanged.
    """
    parts = _parts(model)
    config = getattr(model, "config", None)
    if rotation_of(model):
        raise RotationError(f"rotate_residual: the model is already rotated ({ROTATION_ATTRIBUTE}="
                            f"{rotation_of(model)!r}); rotate the original model instead")
    embed, head = parts["embed"], parts["head"]
    d = embed.weight.shape[1]
    q = torch.as_tensor(basis).detach().to(torch.float64).cpu()
    if q.shape != (d, d):
        raise ValueError(f"rotate_residual: basis has shape {tuple(q.shape)}; expected ({d}, {d}) (the hidden size)")
    error = (q.T @ q - torch.eye(d, dtype=torch.float64)).abs().max().item()
    if not error < 1e-6:
        raise ValueError(f"rotate_residual: basis is not orthogonal (max |QᵀQ - I| = {error:.3g})")

    tied = head.weight is embed.weight

    def retie() -> None:
        if tied:
            head.weight = embed.weight

    checked_fold(model, parts, lambda: _fold(parts, q, tied), "rotate_residual",
                 "the model computes something besides the Llama layout (a norm other than g * h / rms(h), or a "
                 "reader or writer outside the fold), and was restored", undo=retie)
    # Whatever the flag said before: the head and the embedding differ now, and a reload must not tie them again.
    if config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    if config is not None:
        setattr(config, ROTATION_ATTRIBUTE, rotation_fingerprint(q))


def checked_fold(model: nn.Module, parts, fold: Callable[[], None], who: str, cause: str,
                 undo: Callable[[], None] = lambda: None) -> None:
    """Run ``fold`` (which changes the weights of ``parts`` in place) between two runs of the probe tokens.

    If the logits moved beyond rounding (the tolerances above, by the touched weights' dtypes), or anything fails,
    ``undo`` runs, every touched weight is restored from a host copy (no second copy on the device), and the error
    (RotationError ``"{who}: {model}: the fold moved the probe logits ...; {cause}"``) is raised: the model is
    either folded or unchanged. Training flags are kept.
    """
    embed = parts["embed"]
    touched = _touched_parameters(parts)
    saved = [(param, param.detach().to("cpu", copy=True)) for param in touched]
    states = _training_states(model)
    model.eval()
    try:
        before = _probe_logits(model, embed.weight.shape[0], embed.weight.device)
        fold()
        after = _probe_logits(model, embed.weight.shape[0], embed.weight.device)
        tolerance = max(_PROBE_TOLERANCE.get(param.dtype, _PROBE_TOLERANCE_LOW) for param in touched)
        moved = (after - before).abs().max().item()
        largest = before.abs().max().item() or 1.0
        if not moved <= tolerance * largest:
            raise RotationError(f"{who}: {type(model).__name__}: the fold moved the probe logits by {moved:.3g} "
                                f"(largest logit {largest:.3g}, allowed {tolerance:g} of it); {cause}")
    except BaseException:
        undo()
        with torch.no_grad():
            for param, value in saved:
                param.data.copy_(value.to(param.device))
        raise
    finally:
        _restore_training(states)


def _touched_parameters(parts) -> List[nn.Parameter]:
    params = [parts["embed"].weight, parts["final"].weight, parts["head"].weight]
    for layer in parts["layers"]:
        params += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        for module in [getattr(layer.self_attn, n) for n in (*_READERS_ATTN, "o_proj")] + \
                      [getattr(layer.mlp, n) for n in (*_READERS_FFN, "down_proj")]:
            params += [module.weight] + ([module.bias] if module.bias is not None else [])
    unique, seen = [], set()
    for param in params:
        if id(param) not in seen:
            seen.add(id(param))
            unique.append(param)
    return unique


def _fold(parts, q: torch.Tensor, tied: bool) -> None:
    """The fold itself (every new weight computed in float64 from the current ones, then stored)."""
    def store(param: nn.Parameter, value: torch.Tensor) -> None:
        param.data.copy_(value.to(device=param.device, dtype=param.dtype))

    def read(linear: nn.Linear, scale: torch.Tensor) -> None:          # W -> W diag(g) Q
        w = linear.weight.detach().double().cpu()
        store(linear.weight, (w * scale[None, :]) @ q)

    def write(linear: nn.Linear) -> None:                                # W -> Qᵀ W, b -> b Q
        store(linear.weight, q.T @ linear.weight.detach().double().cpu())
        if linear.bias is not None:
            store(linear.bias, linear.bias.detach().double().cpu() @ q)

    def take_scale(norm) -> torch.Tensor:
        scale = norm.weight.detach().double().cpu().clone()
        store(norm.weight, torch.ones_like(scale))
        return scale

    embed, head = parts["embed"], parts["head"]
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    with torch.no_grad():
        store(embed.weight, embed.weight.detach().double().cpu() @ q)
        for layer in parts["layers"]:
            scale = take_scale(layer.input_layernorm)
            for name in _READERS_ATTN:
                read(getattr(layer.self_attn, name), scale)
            write(layer.self_attn.o_proj)
            scale = take_scale(layer.post_attention_layernorm)
            for name in _READERS_FFN:
                read(getattr(layer.mlp, name), scale)
            write(layer.mlp.down_proj)
        read(head, take_scale(parts["final"]))
