"""Random transformer blocks: dense specs equal eager, sparse specs equal independently computed semantics."""

import os

import torch
from hypothesis import given

import sparsecc
from tests import strategies, zoo


def _build(cfg, dtype=torch.float32):
    torch.manual_seed(cfg["seed"])
    block = zoo.Block(cfg["attn_cls"], cfg["ffn_cls"], cfg["hidden"], cfg["heads"], cfg["kv_heads"],
                      cfg["inner"], cfg["bias"]).eval().to(dtype)
    x = torch.randn(cfg["batch"], cfg["seq"], cfg["hidden"], dtype=dtype)
    return block, x


def _keep(rule, seq):
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    if rule["form"] == "streaming":
        sink, window = rule["sink"], rule["window"]
        # the causal intersection is applied by the block's own expected(); this is the bidirectional rule
        return (j < sink) | (i < sink) | ((i - j).abs() < window)
    qb, kb = i // rule["block"], j // rule["block"]
    g = rule["global_blocks"]
    return ((qb - kb).abs() < rule["local_blocks"]) | (qb < g) | (kb < g)


@given(cfg=strategies.block_configs(), bf16=strategies.st.booleans())
def test_dense_spec_equals_eager(cfg, bf16):
    torch._dynamo.reset()
    block, x = _build(cfg, torch.bfloat16 if bf16 else torch.float32)
    spec = {"version": 1, "attention": [{"form": "dense"}], "ffn": [{"form": "dense"}]}
    with torch.no_grad():
        out = _compile_eager(block, spec)(x)
        ref = block(x)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def _compile_eager(block, spec, **kw):
    """Compile with the FX graph run directly (Inductor per hypothesis example would take minutes)."""
    with _eager_lowering():
        compiled = sparsecc.compile(block, spec=spec, **kw)
    return lambda *a: _call(compiled, *a)


def _call(compiled, *args):
    with _eager_lowering():
        return compiled(*args)


class _eager_lowering:
    def __enter__(self):
        self.old = os.environ.get("SPARSECC_LOWERING")
        os.environ["SPARSECC_LOWERING"] = "eager"

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("SPARSECC_LOWERING", None)
        else:
            os.environ["SPARSECC_LOWERING"] = self.old


@given(cfg=strategies.block_configs(), attn=strategies.attention_rules(), ffn=strategies.ffn_rules())
def test_sparse_spec_equals_reference_semantics(cfg, attn, ffn):
    torch._dynamo.reset()
    block, x = _build(cfg)
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [attn], "ffn": [ffn]}
    if attn["form"] == "block_sparse" and cfg["seq"] < attn["block"]:
        attn_applies = False  # a block larger than the sequence falls back to dense, with a reason
    else:
        attn_applies = True
    with torch.no_grad():
        out = _compile_eager(block, spec, kernels="reference")(x)
        keep = _keep(attn, cfg["seq"]) if attn_applies else torch.ones(cfg["seq"], cfg["seq"], dtype=torch.bool)
        y = x + block.attn.expected(x, keep)
        expected = y + zoo.ffn_expected(block.mlp, y, ffn["mode"], ffn["threshold"]).float()
    report = sparsecc.last_report()
    attn_site = [s for s in report.sites if s.kind == "attention"][0]
    assert attn_site.applied == attn_applies, attn_site.reason
    assert [s.applied for s in report.sites if s.kind == "ffn"] == [True]
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)
