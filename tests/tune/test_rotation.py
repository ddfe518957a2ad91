"""The residual-stream rotation folded into a Llama's weights: same logits, rotated FFN inputs, refusals."""

import pytest
import torch

import sparsecc
from sparsecc.spec import Defaults, Spec
from sparsecc.tune import ffn_rules
from sparsecc.tune.capture import ffn_projections, quantile_tau, score_samples
from sparsecc.tune import rotation as rotation_module
from sparsecc.tune.rotation import (ROTATION_ATTRIBUTE, RotationError, residual_basis, rotate_residual,
                                    rotation_fingerprint)

transformers = pytest.importorskip("transformers")
from tests.quality import tiny  # noqa: E402


def _ids(seed=1, tokens=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, len(tiny.WORDS) + 1, (1, tokens), generator=g)


def _random_orthogonal(d, seed=3):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def _with_random_norm_scales(model):
    # Random init leaves every RMSNorm scale at 1; non-trivial scales make the fold matter.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.copy_(0.5 + torch.rand(param.shape, generator=g, dtype=torch.float64))
    return model


def _ffn_inputs(model, ids, mask=None):
    got = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach().clone()))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, got


def test_rotation_keeps_the_logits_and_rotates_the_ffn_inputs():
    model = _with_random_norm_scales(tiny.model().double())
    model.lm_head.weight = model.model.embed_tokens.weight   # tied, as SmolLM2's: the fold must untie them
    model.config.tie_word_embeddings = True
    ids = _ids()
    before, inputs_before = _ffn_inputs(model, ids)
    scales = [layer.post_attention_layernorm.weight.detach().clone() for layer in model.model.layers]
    embedding = model.model.embed_tokens.weight.detach().clone()
    q = _random_orthogonal(32)
    rotate_residual(model, q)
    after, inputs_after = _ffn_inputs(model, ids)
    # transformers' RMSNorm normalises in float32 even in a float64 model: rounding at 1e-7, not a float64 1e-15.
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)
    # What an FFN threshold sees now: the norm's unscaled output, rotated.
    for x0, x1, g in zip(inputs_before, inputs_after, scales):
        torch.testing.assert_close(x1, (x0 / g) @ q, atol=1e-6, rtol=1e-5)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(model.model.embed_tokens.weight, embedding @ q)
    assert all(bool((layer.input_layernorm.weight == 1).all()) for layer in model.model.layers)


def test_float32_model_keeps_its_logits_to_rounding():
    model = _with_random_norm_scales(tiny.model())
    ids = _ids(seed=2)
    before, _ = _ffn_inputs(model, ids)
    rotate_residual(model, _random_orthogonal(32))
    assert model.lm_head.weight.dtype == torch.float32
    after, _ = _ffn_inputs(model, ids)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_basis_diagonalises_the_pooled_second_moment_of_the_unscaled_ffn_inputs():
    model = _with_random_norm_scales(tiny.model().double())
    batches = [{"input_ids": _ids(seed=s), "use_cache": False} for s in (1, 2)]
    q = residual_basis(model, batches)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q.T @ q, torch.eye(32, dtype=torch.float64), atol=1e-10, rtol=0)
    moment = torch.zeros(32, 32, dtype=torch.float64)
    for batch in batches:
        _, inputs = _ffn_inputs(model, batch["input_ids"])
        for x, layer in zip(inputs, model.model.layers):
            z = (x / layer.post_attention_layernorm.weight).reshape(-1, 32)
            moment += z.T @ z
    rotated = q.T @ moment @ q
    off = rotated - torch.diag(torch.diagonal(rotated))
    assert off.abs().max() < 1e-8 * moment.abs().max()
    assert (torch.diagonal(rotated)[1:] >= torch.diagonal(rotated)[:-1] - 1e-9).all()   # ascending


def test_a_spec_tuned_on_the_rotated_model_compiles_and_thresholds_its_rotated_inputs(eager_lowering):
    model = _with_random_norm_scales(tiny.model())
    batches = [{"input_ids": _ids(seed=s), "use_cache": False} for s in (1, 2)]
    rotate_residual(model, residual_basis(model, batches))
    report = sparsecc.explain(model, **batches[0])
    projections = ffn_projections(model, report, "input")
    scores = score_samples(model, batches, projections, "magnitude")
    taus = {p: quantile_tau(scores[p], 0.4) for p in projections}
    spec = Spec(defaults=Defaults(policy="force"), ffn=tuple(ffn_rules(projections, taus, "magnitude")))
    with torch.no_grad():
        dense = model(**batches[0]).logits
        sparse = sparsecc.compile(model, spec=spec, kernels="reference")(**batches[0]).logits
    applied = {s.module for s in sparsecc.last_report().sites if s.kind == "ffn" and s.applied}
    assert applied == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert not torch.allclose(sparse, dense, atol=1e-4)


def _biased_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny.WORDS) + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)   # zero-initialised biases would not test their fold
    return _with_random_norm_scales(model)


def test_biases_of_writers_and_readers_fold_too():
    model = _biased_llama()
    ids = _ids()
    before, _ = _ffn_inputs(model, ids)
    rotate_residual(model, _random_orthogonal(32))
    after, _ = _ffn_inputs(model, ids)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)


def test_the_rotated_model_records_its_rotation_and_survives_a_save(tmp_path):
    from transformers import AutoModelForCausalLM
    model = _with_random_norm_scales(tiny.model())
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    q = _random_orthogonal(32)
    rotate_residual(model, q)
    # The fingerprint is the first 16 hex digits of the SHA-256 of Q's float64 bytes.
    import hashlib
    assert getattr(model.config, ROTATION_ATTRIBUTE) == hashlib.sha256(q.numpy().tobytes()).hexdigest()[:16]
    assert rotation_fingerprint(q) == getattr(model.config, ROTATION_ATTRIBUTE)
    ids = _ids()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert getattr(loaded.config, ROTATION_ATTRIBUTE) == rotation_fingerprint(q)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits)
    with pytest.raises(RotationError, match="already rotated"):
        rotate_residual(loaded, q)


def test_tuned_specs_record_the_rotation_and_compile_warns_on_the_other_model(tmp_path, eager_lowering):
    batches = [{"input_ids": _ids(seed=s), "use_cache": False} for s in (1, 2)]
    plain = tiny.model()
    rotated = tiny.model()
    rotate_residual(rotated, residual_basis(rotated, batches))
    spec = sparsecc.tune(rotated, batches, target=0.3, method="separable", error_fn="kl", levels=(0.3, 0.6),
                         progress=False)
    assert spec.meta["tune"]["residual_rotation"] == getattr(rotated.config, ROTATION_ATTRIBUTE)
    with pytest.warns(sparsecc.SparseccWarning, match="residual rotation"):
        sparsecc.compile(plain, spec=spec, kernels="reference")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsecc.compile(rotated, spec=spec, kernels="reference")


def test_padding_positions_are_left_out_of_the_basis():
    model = _with_random_norm_scales(tiny.model().double())
    ids = _ids(tokens=12)
    mask = torch.ones_like(ids)
    mask[:, :4] = 0
    padded = residual_basis(model, [{"input_ids": ids, "attention_mask": mask, "use_cache": False}])
    moment = torch.zeros(32, 32, dtype=torch.float64)
    _, inputs = _ffn_inputs(model, ids, mask)
    for x, layer in zip(inputs, model.model.layers):
        z = (x[0, 4:] / layer.post_attention_layernorm.weight).reshape(-1, 32)
        moment += z.T @ z
    want = torch.linalg.eigh(moment)[1]
    # Eigenvectors are defined up to sign: compare |cos| of matching columns.
    cos = (padded * want).sum(0).abs()
    assert torch.allclose(cos, torch.ones(32, dtype=torch.float64), atol=1e-6)


def test_a_norm_other_than_rms_times_scale_is_caught_by_the_probe_and_the_model_restored():
    from transformers import GemmaConfig, GemmaForCausalLM
    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.5)   # Gemma scales by (1 + w); w = 0 would hide the difference
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(RotationError, match="moved the probe logits"):
        rotate_residual(model, _random_orthogonal(32))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert tied and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, ROTATION_ATTRIBUTE, None) is None


def test_a_failure_inside_the_fold_restores_every_weight(monkeypatch):
    model = _with_random_norm_scales(tiny.model())
    model.lm_head.weight = model.model.embed_tokens.weight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    real_fold = rotation_module._fold

    def failing_fold(parts, q, tied):
        real_fold(parts, q, tied)
        raise RuntimeError("disk full")

    monkeypatch.setattr(rotation_module, "_fold", failing_fold)
    with pytest.raises(RuntimeError, match="disk full"):
        rotate_residual(model, _random_orthogonal(32))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_bfloat16_model_passes_the_probe_and_keeps_its_logits_to_rounding():
    model = _with_random_norm_scales(tiny.model()).to(torch.bfloat16)
    model.model.layers[0].mlp.eval()
    model.train()
    model.model.layers[0].mlp.eval()   # a submodule deliberately in eval mode keeps it
    ids = _ids(seed=4)
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    rotate_residual(model, _random_orthogonal(32))
    assert model.training and not model.model.layers[0].mlp.training
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        after = model(input_ids=ids).logits.float()
    assert (after - before).abs().max() <= 2e-2 * before.abs().max()


def test_a_stale_tie_flag_is_cleared():
    # The config says tied, the weights are separate copies: a reload must not tie the rotated embedding to the head.
    model = tiny.model()
    model.config.tie_word_embeddings = True
    rotate_residual(model, _random_orthogonal(32))
    assert model.config.tie_word_embeddings is False


def test_a_spec_whose_meta_tune_is_not_a_table_compiles_without_the_check():
    spec = Spec(defaults=Defaults(policy="force"), meta={"tune": "by hand"})
    sparsecc.compile(tiny.model(), spec=spec, kernels="reference")


def test_refusals_name_the_problem_and_leave_the_model_alone():
    model = tiny.model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not orthogonal"):
        rotate_residual(model, 2 * torch.eye(32))
    with pytest.raises(ValueError, match=r"shape \(16, 16\); expected \(32, 32\)"):
        rotate_residual(model, torch.eye(16))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(RotationError, match="has no 'model.embed_tokens'"):
        rotate_residual(torch.nn.Linear(4, 4), torch.eye(4))
    model.model.norm = torch.nn.LayerNorm(32)
    with pytest.raises(RotationError, match="model.norm is a LayerNorm, not an RMS norm"):
        rotate_residual(model, torch.eye(32))
    # A reader that computes more than its weight (a LoRA-style wrapper) is refused, not half-folded.
    model = tiny.model()

    class Wrapped(torch.nn.Linear):
        pass

    model.model.layers[1].self_attn.q_proj = Wrapped(32, 32, bias=False)
    with pytest.raises(RotationError, match=r"model.layers.1.self_attn.q_proj is a Wrapped, not an nn.Linear"):
        rotate_residual(model, torch.eye(32))
    model = tiny.model()
    model.model.layers[0].extra_norm = type(model.model.norm)(32)
    with pytest.raises(RotationError, match=r"model.layers.0 has norms besides .*'extra_norm'"):
        rotate_residual(model, torch.eye(32))
