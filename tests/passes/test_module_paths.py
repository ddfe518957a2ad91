"""Site paths are the names ``model.named_modules()`` prints, however the model is compiled.

Every way of compiling below reaches the same modules; the report must name
them exactly as the compiled root's own ``named_modules()`` does, and a spec
written with those names must apply.
"""

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc
from sparsecc.backend import rewritten_graphs


class Attn(nn.Module):
    def __init__(self, hidden=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(s, x):   # not named "self" on purpose: Dynamo's source is then L['s']
        b, n, d = x.shape
        q, k, v = s.qkv(x).view(b, n, 3, s.heads, d // s.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return s.proj(out.transpose(1, 2).reshape(b, n, d))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, x):
        return x + self.attn(x)


class Net(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _args_wrapper(fn):
    """A decorator that hides ``self`` in ``*args``, as transformers >= 5.2x does on ``forward``."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapped


class WrappedNet(Net):
    @_args_wrapper
    def forward(self, x):
        return super().forward(x)


SPEC = {"version": 1, "attention": [{"modules": "layers.*.attn", "form": "streaming", "sink": 1, "window": 4,
                                     "policy": "force"}],
        "linear": [{"modules": "layers.1.attn.proj", "form": "2:4", "policy": "force"}]}


def _x():
    return torch.randn(1, 16, 32)


def _attention_paths(report):
    return sorted(s.module for s in report.sites if s.kind == "attention")


def _applied(report):
    return sorted((s.kind, s.module) for s in report.sites if s.applied)


EXPECTED_APPLIED = [("attention", "layers.0.attn"), ("attention", "layers.1.attn"), ("linear", "layers.1.attn.proj")]

_GLOBAL_NET = Net()


def _compile_styles():
    """(name, the module whose named_modules() the paths follow, a callable to compile, its arguments)."""
    def plain_function(model, x):
        return model(x)

    def global_closure(x):
        return _GLOBAL_NET(x)

    net, wrapped, via_forward = Net(), WrappedNet(), Net()
    return {
        "module": (net, net, None),
        "args-wrapped forward": (wrapped, wrapped, None),
        "bound forward": (via_forward, via_forward.forward, None),
        "plain function f(model, x)": (net, plain_function, (net,)),
        "global used by a function": (_GLOBAL_NET, global_closure, None),
    }


@pytest.mark.parametrize("style", sorted(_compile_styles()))
def test_paths_equal_named_modules_however_compiled(style, eager_lowering):
    root, target, leading = _compile_styles()[style]
    names = dict(root.named_modules())
    args = (leading or ()) + (_x(),)
    with torch.no_grad():
        compiled = sparsecc.compile(target, spec=SPEC, kernels="reference")
        compiled(*args)
    report = sparsecc.last_report()
    assert _attention_paths(report) == ["layers.0.attn", "layers.1.attn"]
    assert all(s.module in names for s in report.sites), [s.module for s in report.sites]
    assert _applied(report) == EXPECTED_APPLIED
    assert rewritten_graphs()


def test_submodule_paths_are_relative_to_the_submodule(eager_lowering):
    net = Net()
    layer = net.layers[1]
    spec = {"version": 1, "attention": [{"modules": "attn", "form": "streaming", "sink": 1, "window": 4,
                                         "policy": "force"}]}
    with torch.no_grad():
        sparsecc.compile(layer, spec=spec, kernels="reference")(_x())
    report = sparsecc.last_report()
    assert _applied(report) == [("attention", "attn")]
    assert {s.module for s in report.sites} <= set(dict(layer.named_modules()))


def test_sequential_root_and_children_use_their_own_names(eager_lowering):
    seq = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    spec = {"version": 1, "linear": [{"modules": "0", "form": "2:4", "policy": "force"}],
            "ffn": [{"modules": "*", "form": "dense"}]}
    with torch.no_grad():
        sparsecc.compile(seq, spec=spec, kernels="reference")(torch.randn(4, 32))
    report = sparsecc.last_report()
    assert sorted(s.module for s in report.sites if s.kind == "linear") == ["0", "2"]
    assert [s.module for s in report.sites if s.kind == "ffn"] == [""]
    assert _applied(report) == [("linear", "0")]


def test_torch_compile_with_options_uses_the_same_names(eager_lowering):
    model = WrappedNet()
    with torch.no_grad():
        torch.compile(model, backend="sparsecc", options={"spec": SPEC, "kernels": "reference"})(_x())
    assert _applied(sparsecc.last_report()) == EXPECTED_APPLIED


def test_shared_module_takes_its_first_name(eager_lowering):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(32, 32)
            self.second = self.first

        def forward(self, x):
            return self.second(x)

    model = Tied()
    with torch.no_grad():
        sparsecc.compile(model, kernels="reference")(torch.randn(2, 32))
    assert [s.module for s in sparsecc.last_report().sites] == ["first"]
    assert [n for n, _ in model.named_modules()] == ["", "first"]


class BrokenLayer(Layer):
    """A layer whose forward Dynamo cannot trace whole: each layer's code after the break is a frame of its own,
    compiled with the layer as its only module (as an HF decoder layer is after a graph break in its MoE block)."""

    def forward(self, x):
        torch._dynamo.graph_break()
        return x + self.attn(x)


class BrokenNet(Net):
    def __init__(self, layers=2):
        super().__init__(layers)
        self.layers = nn.ModuleList(BrokenLayer() for _ in range(layers))


def _streaming_net_oracle(net, x, sink, window):
    """``net`` with every layer's attention restricted to docs/spec.md's causal streaming keep mask (float64)."""
    x = x.double()
    n = x.shape[1]
    p = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    keep = (j <= p) & ((j < sink) | (p - j < window))
    for layer in net.layers:
        attn = layer.attn
        b, _, d = x.shape
        q, k, v = F.linear(x, attn.qkv.weight.double(), attn.qkv.bias.double()).view(
            b, n, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-1, -2)) / (d // attn.heads) ** 0.5
        out = logits.masked_fill(~keep, float("-inf")).softmax(-1) @ v
        x = x + F.linear(out.transpose(1, 2).reshape(b, n, d), attn.proj.weight.double(), attn.proj.bias.double())
    return x


@pytest.mark.parametrize("entry", ["sparsecc.compile", "torch.compile"])
def test_frames_inside_the_model_are_named_from_the_compiled_model(entry, eager_lowering):
    """After a graph break each layer's frame holds only that layer; its sites are still named (and the spec
    applied) from the model the user compiled, and the report of the compile holds every layer's sites."""
    torch.manual_seed(0)
    net = BrokenNet().eval()
    x = _x()
    spec = {"version": 1, "attention": [{"modules": "layers.*.attn", "form": "streaming", "sink": 1, "window": 4,
                                         "policy": "force"}]}
    with torch.no_grad():
        if entry == "sparsecc.compile":
            compiled = sparsecc.compile(net, spec=spec, kernels="reference")
        else:
            compiled = torch.compile(net, backend="sparsecc", options={"spec": spec, "kernels": "reference"})
        out = compiled(x)
    report = sparsecc.last_report()
    assert report.graphs >= 2   # the break is real: the layers were compiled as frames of their own
    assert _applied(report) == [("attention", "layers.0.attn"), ("attention", "layers.1.attn")]
    assert not report.unmatched_rules()
    torch.testing.assert_close(out.double(), _streaming_net_oracle(net, x, 1, 4), atol=1e-5, rtol=1e-5)


def test_a_rule_for_one_layer_is_not_reused_by_the_others(eager_lowering):
    """One graph of a layer's frame would serve every layer that passes Dynamo's guards: a rule naming layer 0
    alone must leave layer 1 dense (its frame is compiled, and decided, for its own module)."""
    torch.manual_seed(1)
    net = BrokenNet().eval()
    x = _x()
    spec = {"version": 1, "attention": [{"modules": "layers.0.attn", "form": "streaming", "sink": 1, "window": 4,
                                         "policy": "force"}]}
    with torch.no_grad():
        out = sparsecc.compile(net, spec=spec, kernels="reference")(x)
    report = sparsecc.last_report()
    assert _applied(report) == [("attention", "layers.0.attn")]
    assert [(s.module, s.reason) for s in report.sites if s.kind == "attention" and not s.applied] == \
        [("layers.1.attn", "no rule")]
    first = BrokenNet(layers=1).eval()
    first.layers[0] = net.layers[0]
    with torch.no_grad():
        expected = net.layers[1](_streaming_net_oracle(first, x, 1, 4).float())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


class FfnLayer(nn.Module):
    def __init__(self):
        super().__init__()
        from tests.zoo import GatedSiluFFN
        self.mlp = GatedSiluFFN()

    def forward(self, x):
        return x + self.mlp(x)


def _break(module, args):
    """A forward pre-hook that Dynamo cannot trace (as a logging or offloading hook may be)."""
    torch._dynamo.graph_break()


def test_a_module_whose_own_forward_is_the_frame_keeps_its_path(eager_lowering):
    """A graph break in a pre-hook makes each MLP's forward a frame of its own: the FFN site (its activation and
    product have no module below the MLP) is still the MLP's path, and a rule naming one layer applies there."""
    from tests.zoo import ffn_expected

    torch.manual_seed(2)
    net = Net().eval()
    net.layers = nn.ModuleList(FfnLayer() for _ in range(2))
    for layer in net.layers:
        layer.mlp.register_forward_pre_hook(_break)
    x = _x()
    spec = {"version": 1, "ffn": [{"modules": "layers.1.mlp", "form": "activation_threshold", "mode": "gate",
                                   "threshold": 0.05, "policy": "force"}]}
    with torch.no_grad():
        out = sparsecc.compile(net, spec=spec, kernels="reference")(x)
        h = x + net.layers[0].mlp(x)
    report = sparsecc.last_report()
    assert sorted(s.module for s in report.sites if s.kind == "ffn") == ["layers.0.mlp", "layers.1.mlp"]
    assert _applied(report) == [("ffn", "layers.1.mlp")]
    expected = h.double() + ffn_expected(net.layers[1].mlp, h, "gate", 0.05)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
