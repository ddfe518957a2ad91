"""Hand-written modules: several spellings of attention, FFN and linear, each with its own causality.

Every attention module exposes ``attend(q, k, v)`` (the spelling under test)
and ``causal``; ``expected(x, keep)`` recomputes the block's output with a
test-built boolean keep mask [Sq, Sk] (or [H, Sq, Sk]) applied to plain dense
attention, so sparse results are checked against semantics the test builds
itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class AttentionBlock(nn.Module):
    """Projections around an attention spelling; subclasses define ``attend``."""

    causal = True
    folded = False

    def __init__(self, hidden=32, heads=4, kv_heads=2, bias=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=bias)

    def qkv(self, x):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x)
        out = self.attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def expected(self, x, keep):
        """Output with dense attention restricted to ``keep`` (and this block's causality), in float64."""
        b, s, _ = x.shape
        q, k, v = (t.double() for t in self.qkv(x))
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        logits = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        full = torch.ones(s, s, dtype=torch.bool, device=keep.device)
        if self.causal:
            full = torch.tril(full)
        keep = keep & full
        logits = logits.masked_fill(~keep, float("-inf"))
        p = torch.softmax(logits, -1).nan_to_num(0.0)
        out = (p @ v).to(x.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def repeat_kv(x, n_rep):
    """The HF idiom: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D] via expand + reshape."""
    b, h, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class SdpaAttention(AttentionBlock):
    """F.scaled_dot_product_attention, causal, GQA by enable_gqa."""

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class SdpaRepeatAttention(AttentionBlock):
    """SDPA after an HF-style repeat_kv, non-causal."""

    causal = False

    def attend(self, q, k, v):
        rep = self.heads // self.kv_heads
        return F.scaled_dot_product_attention(q, repeat_kv(k, rep), repeat_kv(v, rep))


class MatmulMaskedFillAttention(AttentionBlock):
    """q @ kᵀ * scale, masked_fill by a causal buffer, float softmax, eval dropout, @ v."""

    def __init__(self, *a, max_len=512, **kw):
        super().__init__(*a, **kw)
        self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)
        self.drop = nn.Dropout(0.1)

    def attend(self, q, k, v):
        s = q.shape[-2]
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        a = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        a = a.masked_fill(~self.tril[:s, :s], float("-inf"))
        a = F.softmax(a.float(), dim=-1).to(q.dtype)
        return torch.matmul(self.drop(a), v)


class EinsumAdditiveAttention(AttentionBlock):
    """einsum logits / sqrt(d) + additive causal mask, torch.softmax, einsum with v."""

    def attend(self, q, k, v):
        s = q.shape[-2]
        rep = self.heads // self.kv_heads
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        mask = torch.full((s, s), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        a = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(self.head_dim) + mask
        a = torch.softmax(a, dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", a, v)


class BmmFoldedAttention(AttentionBlock):
    """Heads folded into the batch, torch.bmm both products, non-causal."""

    causal = False
    folded = True

    def attend(self, q, k, v):
        b, h, s, d = q.shape
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        q3, k3, v3 = (t.reshape(b * h, s, d) for t in (q, k, v))
        a = torch.bmm(q3, k3.transpose(1, 2)) * d ** -0.5
        a = a.softmax(dim=-1)
        return torch.bmm(a, v3).view(b, h, s, d)


ATTENTION_SPELLINGS = (SdpaAttention, SdpaRepeatAttention, MatmulMaskedFillAttention, EinsumAdditiveAttention,
                       BmmFoldedAttention)


class ReusedLogitsAttention(AttentionBlock):
    """Negative case: the attention probabilities are also returned, so they cannot be fused away."""

    causal = False

    def forward(self, x):
        q, k, v = self.qkv(x)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return p @ v, p


# ---------------------------------------------------------------- FFN spellings

class PlainGeluFFN(nn.Module):
    """fc2(gelu(fc1(x)))."""

    gated, act = False, "gelu"

    def __init__(self, hidden=32, inner=64, bias=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, inner, bias=bias), nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class HandTanhGeluFFN(PlainGeluFFN):
    """The GPT-2 tanh-GELU formula written out by hand."""

    act = "gelu_tanh"

    def forward(self, x):
        h = self.fc1(x)
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return self.fc2(h)


class ReluSquaredFFN(PlainGeluFFN):
    """relu(x) ** 2 (Primer)."""

    act = "relu2"

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) ** 2)


class GatedSiluFFN(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x))."""

    gated, act = True, "silu"

    def __init__(self, hidden=32, inner=64, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FusedGateUpFFN(nn.Module):
    """One fused gate_up Linear split by chunk; GELU gate; up first in the product."""

    gated, act = True, "gelu"

    def __init__(self, hidden=32, inner=64, bias=True):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=bias)
        self.down = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(up * F.gelu(gate))


FFN_SPELLINGS = (PlainGeluFFN, HandTanhGeluFFN, ReluSquaredFFN, GatedSiluFFN, FusedGateUpFFN)


class ReusedHiddenFFN(PlainGeluFFN):
    """Negative case: the activation output is used twice."""

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        return self.fc2(h), h.sum()


# ---------------------------------------------------------------- linear spellings

class ModuleLinear(nn.Module):
    """nn.Linear."""

    def __init__(self, k=32, n=64):
        super().__init__()
        self.proj = nn.Linear(k, n)

    def forward(self, x):
        return self.proj(x)


class StaticCacheUpdate(nn.Module):
    """A linear layer plus an in-place update of a cache tensor passed in (a static KV cache's pattern)."""

    def __init__(self, hidden=32):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x, cache):
        cache.add_(1.0)
        return self.proj(x) + cache


class FunctionalLinear(nn.Module):
    """F.linear with raw parameters."""

    def __init__(self, k=32, n=64):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, k) / math.sqrt(k))
        self.bias = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MatmulTransposeLinear(FunctionalLinear):
    """x @ W.t() + b."""

    def forward(self, x):
        return x @ self.weight.t() + self.bias


class Conv1DLinear(nn.Module):
    """GPT-2 Conv1D: weight [in, out], addmm on a 2-D view."""

    def __init__(self, k=32, n=64):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, n) / math.sqrt(k))
        self.bias = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(shape)


LINEAR_SPELLINGS = (ModuleLinear, FunctionalLinear, MatmulTransposeLinear, Conv1DLinear)


class BufferWeightLinear(nn.Module):
    """Negative case: the weight is a buffer, not a parameter."""

    def __init__(self, k=32, n=64):
        super().__init__()
        self.register_buffer("weight", torch.randn(n, k))

    def forward(self, x):
        return F.linear(x, self.weight)


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
               "relu2": lambda t: torch.relu(t) ** 2, "silu": F.silu}


def _threshold(t, tau):
    return t * (t.abs() > tau)


def ffn_expected(ffn, x, mode, tau):
    """activation_threshold semantics for one of the FFN spellings, from its weights, in float64."""
    x = x.double()
    act = ACTIVATIONS[ffn.act]
    if isinstance(ffn, FusedGateUpFFN):
        w, b = ffn.gate_up.weight.double(), None if ffn.gate_up.bias is None else ffn.gate_up.bias.double()
        inner = w.shape[0] // 2
        def lin_g(t): return F.linear(t, w[:inner], None if b is None else b[:inner])
        def lin_u(t): return F.linear(t, w[inner:], None if b is None else b[inner:])
        down = ffn.down
    elif isinstance(ffn, GatedSiluFFN):
        def lin_g(t): return F.linear(t, ffn.gate_proj.weight.double(), _b(ffn.gate_proj))
        def lin_u(t): return F.linear(t, ffn.up_proj.weight.double(), _b(ffn.up_proj))
        down = ffn.down_proj
    else:
        def lin_g(t): return F.linear(t, ffn.fc1.weight.double(), _b(ffn.fc1))
        lin_u = None
        down = ffn.fc2

    def lin_d(t):
        return F.linear(t, down.weight.double(), _b(down))
    if mode == "input":
        xi = _threshold(x, tau)
        h = act(lin_g(xi)) * (lin_u(xi) if lin_u else 1.0)
        return lin_d(_threshold(h, tau))
    a = act(lin_g(x))
    return lin_d(_threshold(a, tau) * (lin_u(x) if lin_u else 1.0))


def _b(linear):
    return None if linear.bias is None else linear.bias.double()


class Block(nn.Module):
    """A transformer block assembled from one attention and one FFN spelling (pre-norm omitted)."""

    def __init__(self, attn_cls, ffn_cls, hidden, heads, kv_heads, inner, bias):
        super().__init__()
        self.attn = attn_cls(hidden=hidden, heads=heads, kv_heads=kv_heads, bias=bias)
        self.mlp = ffn_cls(hidden=hidden, inner=inner, bias=bias)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class TwoMlps(nn.Module):
    """Two MLPs with residual adds (gated SiLU, then plain GELU), so calibration must find a threshold for each."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([GatedSiluFFN(), PlainGeluFFN()])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


# float64 definitions of the activations, written from the one-line definitions of docs/kernels.md ("Activations");
# the activation-table tests compare the table's torch references and Triton lines with these.
ACTIVATION_DEFINITIONS = {
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "relu2": lambda x: torch.where(x > 0, x, torch.zeros_like(x)) ** 2,
    "silu": lambda x: x / (1 + torch.exp(-x)),
}
