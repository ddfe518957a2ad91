"""Models written for the oracle tests, and the compile-and-compare plumbing.

The attention modules take q ``[B, H, Sq, D]``, k and v ``[B, Hkv, Sk, D]`` and
an optional mask directly, so the oracle sees exactly the tensors the site
sees. Expected values never come from here: they come from ``oracle.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc
from sparsecc.backend import reset_reports, rewritten_graphs
# Hypothesis budgets: ci keeps the whole directory to a few minutes on 2 CPU cores (about 650 cases); deep gives
# every hypothesis test of this directory DEEP_FACTOR times its ci budget (about 13,000 cases in all).
from tests.budgets import examples  # noqa: F401 - the tests read hn.examples

# ---------------------------------------------------------------- tolerances

def tolerance(dtype: torch.dtype) -> dict:
    if dtype == torch.bfloat16:
        return dict(atol=3e-2, rtol=3e-2)
    if dtype == torch.float16:
        return dict(atol=5e-3, rtol=5e-3)
    return dict(atol=3e-5, rtol=3e-4)


def assert_rows_close(out: torch.Tensor, expected: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype,
                      what: str = "") -> None:
    """Compare ``out`` with the float64 ``expected`` on the rows ``valid`` marks (leading dims of out)."""
    assert out.shape == expected.shape, (out.shape, expected.shape)
    got, exp = out.to(torch.float64)[valid], expected[valid]
    torch.testing.assert_close(got, exp, **tolerance(dtype), msg=lambda m: f"{what}\n{m}")


# ---------------------------------------------------------------- compiling

@contextlib.contextmanager
def lowering(kind: str):
    """SPARSECC_LOWERING for the duration (``eager`` runs the rewritten FX graph without Inductor)."""
    old = os.environ.get("SPARSECC_LOWERING")
    if kind == "inductor":
        os.environ.pop("SPARSECC_LOWERING", None)
    else:
        os.environ["SPARSECC_LOWERING"] = kind
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPARSECC_LOWERING", None)
        else:
            os.environ["SPARSECC_LOWERING"] = old


def compile_and_run(model: nn.Module, args, spec: dict, *, lower: str = "eager", calls: int = 1):
    """Compile ``model`` fresh with the sparsecc backend (reference kernels) and call it; (outputs, report)."""
    torch._dynamo.reset()
    reset_reports()
    with lowering(lower), torch.no_grad():
        compiled = torch.compile(model, backend="sparsecc", options={"spec": spec, "kernels": "reference"})
        outs = [compiled(*a) for a in ([args] * calls if not isinstance(args, list) else args)]
    return (outs[0] if len(outs) == 1 else outs), sparsecc.last_report()


def compiled_fn(model: nn.Module, spec: dict, **options):
    """A compiled callable (reference kernels); call it inside ``lowering(...)`` and ``torch.no_grad()``."""
    torch._dynamo.reset()
    reset_reports()
    return torch.compile(model, backend="sparsecc", options={"spec": spec, "kernels": "reference", **options})


def sparse_ops() -> List[str]:
    """The ``torch.ops.sparsecc`` targets in the graphs rewritten since the last reset."""
    return [str(n.target) for gm in rewritten_graphs() for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("sparsecc.")]


def sites(report, kind: str):
    return [s for s in report.sites if s.kind == kind]


def assert_applied(report, kind: str, module: str, form: str) -> None:
    """The report shows ``module`` rewritten into ``form`` and the graph holds a sparsecc op."""
    found = [s for s in sites(report, kind) if s.module == module]
    assert found, f"no {kind} site {module!r}; sites: {[(s.kind, s.module) for s in report.sites]}"
    for s in found:
        assert s.applied and s.form == form, f"{kind} {module}: form={s.form} applied={s.applied}: {s.reason}"
    assert sparse_ops(), "the report says applied but no torch.ops.sparsecc op is in the rewritten graph"


def assert_dense(report, kind: str, module: str, because: Optional[str] = None) -> None:
    """The site was found and stayed dense (``because``: a substring of the reason)."""
    found = [s for s in sites(report, kind) if s.module == module]
    assert found, f"no {kind} site {module!r}; sites: {[(s.kind, s.module) for s in report.sites]}"
    for s in found:
        assert not s.applied, f"{kind} {module} was rewritten ({s.form}): {s.reason}"
        if because is not None:
            assert because in s.reason, f"reason {s.reason!r} does not say {because!r}"


# ---------------------------------------------------------------- attention spellings

def repeat_kv(x, n_rep):
    """HF's repeat_kv: expand + reshape."""
    b, h, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class SdpaGqa(nn.Module):
    """SDPA with enable_gqa; ``is_causal`` when constructed causal and no mask is passed."""

    masks = ("none", "bool", "additive")

    def __init__(self, is_causal=False, scale=None):
        super().__init__()
        self.is_causal, self.scale = is_causal, scale

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.is_causal and mask is None,
                                              scale=self.scale, enable_gqa=True)


class SdpaRepeatKv(SdpaGqa):
    """SDPA after HF's repeat_kv."""

    def forward(self, q, k, v, mask=None):
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep), attn_mask=mask,
                                              is_causal=self.is_causal and mask is None, scale=self.scale)


class SdpaRepeatInterleave(SdpaGqa):
    """SDPA after repeat_interleave on the head dimension."""

    def forward(self, q, k, v, mask=None):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.is_causal and mask is None,
                                              scale=self.scale)


class MatmulMaskedFill(nn.Module):
    """q @ kᵀ * scale, masked_fill(~mask, -inf), float softmax, eval dropout, @ v (bool masks)."""

    masks = ("none", "bool")

    def __init__(self, scale=None):
        super().__init__()
        self.scale = scale
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v, mask=None):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        a = (q @ k.transpose(-2, -1)) * scale
        if mask is not None:
            a = a.masked_fill(~mask, float("-inf"))
        a = F.softmax(a.float(), dim=-1).to(q.dtype)
        return torch.matmul(self.drop(a), v)


class MatmulAdditive(nn.Module):
    """torch.matmul(q, kᵀ) * scale + additive mask, torch.softmax, @ v (repeat_kv GQA)."""

    masks = ("none", "additive")

    def __init__(self, scale=None):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v, mask=None):
        rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        a = torch.matmul(q, k.transpose(-1, -2)) * scale
        if mask is not None:
            a = a + mask
        return torch.softmax(a, dim=-1) @ v


class EinsumAdditive(nn.Module):
    """einsum logits / sqrt(d) + additive mask, softmax, einsum with v."""

    masks = ("none", "additive")

    def __init__(self, scale=None):
        super().__init__()
        assert scale is None

    def forward(self, q, k, v, mask=None):
        rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        a = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if mask is not None:
            a = a + mask
        return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(a, dim=-1), v)


class BmmFolded(nn.Module):
    """Heads folded into the batch, torch.bmm for both products, no mask."""

    masks = ("none",)

    def __init__(self, scale=None):
        super().__init__()
        assert scale is None

    def forward(self, q, k, v, mask=None):
        assert mask is None
        b, h, sq, d = q.shape
        rep = h // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        sk = k.shape[2]
        a = torch.bmm(q.reshape(b * h, sq, d), k.reshape(b * h, sk, d).transpose(1, 2)) * d ** -0.5
        return torch.bmm(a.softmax(dim=-1), v.reshape(b * h, sk, v.shape[-1])).view(b, h, sq, -1)


SPELLINGS = {
    "sdpa_gqa": SdpaGqa,
    "sdpa_repeat_kv": SdpaRepeatKv,
    "sdpa_repeat_interleave": SdpaRepeatInterleave,
    "matmul_masked_fill": MatmulMaskedFill,
    "matmul_additive": MatmulAdditive,
    "einsum_additive": EinsumAdditive,
    "bmm_folded": BmmFolded,
}
# Spellings with an explicit scale argument.
SCALED = ("sdpa_gqa", "sdpa_repeat_kv", "sdpa_repeat_interleave", "matmul_masked_fill", "matmul_additive")


class AttnNet(nn.Module):
    """``layers.{i}.attn``: one attention site per layer, each reading its own (q, k, v, mask)."""

    def __init__(self, spelling: str, n: int = 1, **kw):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(SPELLINGS[spelling](**kw)) for _ in range(n))

    def forward(self, q, k, v, mask=None):
        outs = [layer(q, k, v, mask) for layer in self.layers]
        return outs[0] if len(outs) == 1 else torch.stack(outs)


class _Layer(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v, mask):
        return self.attn(q, k, v, mask)


SITE = "layers.0.attn"


# ---------------------------------------------------------------- masks

def bool_to_additive(keep: torch.Tensor, dtype: torch.dtype, fill: float = float("-inf")) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, fill)


def padding_keep(lengths, sk: int, left: bool) -> torch.Tensor:
    """``[B, Sk]``: True at real tokens; padding on the left or the right of each sequence."""
    j = torch.arange(sk)[None, :]
    n = torch.tensor(lengths)[:, None]
    return j >= sk - n if left else j < n


# ---------------------------------------------------------------- FFN spellings

class PlainFFN(nn.Module):
    """fc2(act(fc1(x))) with a functional activation (or ReLU² written out)."""

    gated = False

    def __init__(self, hidden, inner, act="gelu", bias=True):
        super().__init__()
        self.act = act
        self.fc1, self.fc2 = nn.Linear(hidden, inner, bias=bias), nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        return self.fc2(_act(self.act, self.fc1(x)))


class GatedFFN(nn.Module):
    """down(act(gate(x)) * up(x)) (Llama MLP)."""

    gated = True

    def __init__(self, hidden, inner, act="silu", bias=False):
        super().__init__()
        self.act = act
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(_act(self.act, self.gate_proj(x)) * self.up_proj(x))


class FusedGateUpFFN(nn.Module):
    """One gate_up Linear split by chunk (gate first), up * act(gate), down."""

    gated = True

    def __init__(self, hidden, inner, act="gelu", bias=True):
        super().__init__()
        self.act = act
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=bias)
        self.down = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * _act(self.act, gate))


def _act(name, t):
    if name == "gelu":
        return F.gelu(t)
    if name == "gelu_tanh":   # GPT-2's formula written out
        return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * torch.pow(t, 3.0))))
    if name == "relu":
        return torch.relu(t)
    if name == "relu2":
        return torch.relu(t) ** 2
    if name == "silu":
        return F.silu(t)
    raise ValueError(name)


FFN_SPELLINGS = {"plain": PlainFFN, "gated": GatedFFN, "fused_gate_up": FusedGateUpFFN}


def ffn_weights(ffn: nn.Module):
    """The oracle's view of an FFN module's weights ([out, in], biases), read from its parameters."""
    from tests.oracle.oracle import Ffn

    def b(lin):
        return None if lin.bias is None else lin.bias.detach()
    if isinstance(ffn, PlainFFN):
        return Ffn(ffn.fc1.weight.detach(), b(ffn.fc1), None, None, ffn.fc2.weight.detach(), b(ffn.fc2), ffn.act)
    if isinstance(ffn, GatedFFN):
        return Ffn(ffn.gate_proj.weight.detach(), b(ffn.gate_proj), ffn.up_proj.weight.detach(), b(ffn.up_proj),
                   ffn.down_proj.weight.detach(), b(ffn.down_proj), ffn.act)
    w, bias = ffn.gate_up.weight.detach(), b(ffn.gate_up)
    n = w.shape[0] // 2
    return Ffn(w[:n], None if bias is None else bias[:n], w[n:], None if bias is None else bias[n:],
               ffn.down.weight.detach(), b(ffn.down), ffn.act)


class FfnNet(nn.Module):
    """``mlp``: one FFN site."""

    def __init__(self, ffn):
        super().__init__()
        self.mlp = ffn

    def forward(self, x):
        return self.mlp(x)


# ---------------------------------------------------------------- linear spellings

class ModuleLinear(nn.Module):
    def __init__(self, k, n, bias=True):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias)

    def forward(self, x):
        return self.proj(x)

    def weight_out_in(self):
        return self.proj.weight, self.proj.bias


class FunctionalLinear(nn.Module):
    def __init__(self, k, n, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, k) / math.sqrt(k))
        self.bias = nn.Parameter(torch.randn(n) * 0.1) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def weight_out_in(self):
        return self.weight, self.bias


class MatmulTransposeLinear(FunctionalLinear):
    def forward(self, x):
        y = x @ self.weight.t()
        return y if self.bias is None else y + self.bias


class Conv1DLinear(nn.Module):
    """GPT-2 Conv1D: weight stored [in, out], addmm on a 2-D view."""

    def __init__(self, k, n, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, n) / math.sqrt(k))
        self.bias = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)

    def weight_out_in(self):
        return self.weight.t(), self.bias


LINEAR_SPELLINGS = {"module": ModuleLinear, "functional": FunctionalLinear, "matmul_t": MatmulTransposeLinear,
                    "conv1d": Conv1DLinear}


class LinearNet(nn.Module):
    """``lin``: one linear site."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def linear_expected(lin, rule, x):
    """The oracle's output of a linear site under ``rule`` (2:4 or block_weights) and which output features the
    spec defines: a 2:4 group with tied magnitudes, or a tie at block_weights' density cut, leaves them open."""
    from tests.oracle import oracle

    w, b = lin.weight_out_in()
    w = w.detach()
    if rule["form"] == "2:4":
        pruned, valid_out = oracle.prune_2_4(w)
    else:
        pruned, defined = oracle.prune_block_weights(w, tuple(rule.get("block", (64, 64))), rule.get("density", 0.25))
        valid_out = torch.full((w.shape[0],), defined, dtype=torch.bool)
    exp = oracle.expected_linear(x, pruned, None if b is None else b.detach())
    return exp, valid_out
