"""Ops traced into Inductor's graph: which calls decompose, which stay opaque, and (GPU) that Inductor's
generated code launches the sparse kernels itself with the numbers of docs/spec.md.

CPU: a record whose kernel is a CPU stand-in shows the decomposition (the op disappears from the graph
AOTAutograd hands the compiler, its body's ops take its place); the crossover branch on symbolic shapes
and the reference path keep the op; the registry's schemas and typed arguments.
GPU (``gpu`` marker): streaming decode attention, the TEAL GEMV and the CATS FFN compiled through
``backend="sparsecc"`` leave no ``torch.ops.sparsecc`` call in Inductor's code, launch the kernels by
name, and match float64 oracles built from explicit keep masks.
"""

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsecc.codegen import linear_ops, ops
from sparsecc.codegen.attention_ops import (STREAMING_ATTENTION, BlockSparseAttentionArgs, StreamingAttentionArgs)
from sparsecc.codegen.linear_ops import THRESHOLD_LINEAR, ThresholdLinearArgs
from tests import zoo


def _aot_graphs(fn, *args, dynamic=False):
    """The forward graphs AOTAutograd produces for ``fn(*args)`` (after functionalization), as code."""
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def backend(gm, inputs):
        def keep(g, _):
            graphs.append(g.code)
            return g
        return aot_module_simplified(gm, inputs, fw_compiler=keep)

    with torch.no_grad():
        out = torch.compile(fn, backend=backend, dynamic=dynamic)(*args)
    return out, graphs


@pytest.fixture
def cpu_threshold_kernel(monkeypatch):
    """THRESHOLD_LINEAR with a CPU 'kernel' made of torch ops (x masked by hand, then F.linear)."""
    module = type(sys)("sparsecc_cpu_stand_in")

    def kernel(x, weight, bias, tau, channel_scale=None):
        score = x.abs() if channel_scale is None else x.abs() * channel_scale
        return F.linear(x * (score > tau), weight, bias)

    module.kernel = kernel
    monkeypatch.setitem(sys.modules, module.__name__, module)
    stand_in = dataclasses.replace(THRESHOLD_LINEAR, kernel=f"{module.__name__}:kernel", devices=("cpu",))
    monkeypatch.setattr(linear_ops, "THRESHOLD_LINEAR", stand_in)
    monkeypatch.setitem(ops.RECORDS, stand_in.name, stand_in)
    return stand_in


def test_a_call_with_a_kernel_is_traced_into_the_graph(cpu_threshold_kernel):
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    op = ops.op("threshold_linear")
    out, graphs = _aot_graphs(lambda x, w: op(x, w, None, 0.5, "auto"), x, w)
    assert graphs and "sparsecc" not in graphs[0], graphs[0]
    assert "aten.mm" in graphs[0] or "aten.addmm" in graphs[0] or "aten.linear" in graphs[0], graphs[0]
    expected = (x.double() * (x.double().abs() > 0.5)) @ w.double().t()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_reference_calls_stay_one_opaque_op(cpu_threshold_kernel):
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    op = ops.op("threshold_linear")
    _, graphs = _aot_graphs(lambda x, w: op(x, w, None, 0.5, "reference"), x, w)
    assert "sparsecc.threshold_linear" in graphs[0]
    assert THRESHOLD_LINEAR.launch_mode(ThresholdLinearArgs(0.5, "reference"), x.device, False)[0] == "opaque"
    assert cpu_threshold_kernel.launch_mode(ThresholdLinearArgs(0.5, "auto"), x.device, False) == ("inductor", "")


def test_without_a_kernel_for_the_device_the_op_stays_opaque():
    q = torch.randn(1, 2, 8, 16)
    k = torch.randn(1, 1, 8, 16)
    op = ops.op("streaming_attention")
    out, graphs = _aot_graphs(lambda q, k: op(q, k, k, None, 0.25, True, [2], [4], 0, "auto"), q, k)
    assert "sparsecc.streaming_attention" in graphs[0]
    mode, reason = STREAMING_ATTENTION.launch_mode(StreamingAttentionArgs(0.25, True, (2,), (4,)), q.device, False)
    assert mode == "opaque" and "no Triton kernel for cpu" in reason


@pytest.mark.parametrize("branch, value, why", [("dense_below", 64, "crossover"),
                                               ("own_window", 16, "own sliding window")])
def test_a_runtime_dense_branch_on_symbolic_shapes_stays_opaque(branch, value, why):
    """The crossover and the model's own window are run-time branches on the key length: traced on symbolic
    shapes they would become guards, so such a call stays one opaque op; without the branch it is traced. On
    static shapes the own window is decided while tracing (the compiler decides a graph past it at compile time);
    the crossover, decided per batch element from the mask, stays opaque."""
    args = StreamingAttentionArgs(0.25, True, (2,), (4,), **{branch: value})
    cuda = torch.device("cuda")
    mode, reason = STREAMING_ATTENTION.launch_mode(args, cuda, symbolic=True)
    if STREAMING_ATTENTION.kernel_function(cuda) is None:
        pytest.skip("no Triton: the op has no kernel to trace")
    assert mode == "opaque" and why in reason
    static = STREAMING_ATTENTION.launch_mode(args, cuda, symbolic=False)
    assert static == (("opaque", reason) if branch == "dense_below" else ("inductor", ""))
    assert STREAMING_ATTENTION.launch_mode(dataclasses.replace(args, **{branch: 0}), cuda, True) == ("inductor", "")


def test_records_give_schemas_and_check_their_arguments():
    assert ops.record("streaming_attention").schema() == (
        "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, int[] sink, int[] window, "
        "int dense_below=0, str impl=\"auto\", int own_window=0) -> Tensor")
    assert "Tensor? up_col_idx=None" in ops.record("block_sparse_linear").schema()
    with pytest.raises(KeyError, match="streaming_attention"):
        ops.record("streaming")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(TypeError, match="StreamingAttentionArgs"):
        STREAMING_ATTENTION.flatten({"q": q, "k": q, "v": q}, BlockSparseAttentionArgs(1.0, True, 4, 1, 0, 0, 0))
    with pytest.raises(TypeError, match="missing tensor inputs"):
        STREAMING_ATTENTION.flatten({"q": q}, StreamingAttentionArgs(1.0, True, (1,), (2,)))
    with pytest.raises(ValueError, match="impl='fast'"):
        STREAMING_ATTENTION(StreamingAttentionArgs(1.0, True, (1,), (2,), impl="fast"), q=q, k=q, v=q)


def test_a_record_call_equals_the_positional_op_call():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 12, 16), torch.randn(2, 2, 12, 16)
    args = StreamingAttentionArgs(0.25, True, (2, 1, 0, 3), (4, 4, -1, 2), impl="reference")
    by_record = STREAMING_ATTENTION(args, q=q, k=k, v=k)
    positional = ops.op("streaming_attention")(q, k, k, None, 0.25, True, [2, 1, 0, 3], [4, 4, -1, 2], 0,
                                               "reference")
    assert torch.equal(by_record, positional)


_FAKE_CUDA_SCRIPT = r"""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from sparsecc.codegen import activation_sparse, block_attention, decode_attention, gate_sparse_ffn, threshold_ffn

decode_attention.sm_count = lambda device: 132   # no CUDA device to ask
cuda, f16 = torch.device("cuda"), torch.float16
with FakeTensorMode():
    q = torch.empty(2, 8, 64, 64, device=cuda, dtype=f16)
    k = torch.empty(2, 2, 64, 64, device=cuda, dtype=f16)
    qd = torch.empty(2, 8, 1, 64, device=cuda, dtype=f16)
    kl = torch.empty(2, 2, 1024, 64, device=cuda, dtype=f16)
    x = torch.empty(1, 256, device=cuda, dtype=f16)
    w_km = torch.empty_strided((512, 256), (1, 512), device=cuda, dtype=f16)   # K-major, as the compiler binds
    wg = torch.empty(512, 256, device=cuda, dtype=f16)
    wd_km = torch.empty_strided((256, 512), (1, 256), device=cuda, dtype=f16)   # down [D, F], K-major
    shapes = [
        block_attention.streaming_attention(q, k, k, sink=[4], window=[16], scale=0.1, causal=True).shape,
        block_attention.streaming_attention(q, k, k, sink=[4, 0, 2, 1, 4, 4, 0, 0], window=[16, 8, 8, 8, 16, 16, 4, 4],
                                            scale=0.1, causal=True).shape,
        block_attention.streaming_attention(qd, k, k, sink=[4], window=[16], scale=0.1, causal=True).shape,
        block_attention.streaming_attention(qd, k, k, sink=[4] * 4 + [2] * 4, window=[16] * 4 + [8] * 4, scale=0.1,
                                            causal=True).shape,
        block_attention.streaming_attention(qd, kl, kl, sink=[4], window=[512], scale=0.1, causal=True).shape,   # splits
        activation_sparse.threshold_linear(x, w_km, None, 0.5).shape,
        gate_sparse_ffn.gate_sparse_ffn(x, wg, None, wg, None, wd_km, None, "silu", 0.5).shape,
        activation_sparse.threshold_linear(torch.empty(1, 8192, device=cuda, dtype=f16),
                                           torch.empty_strided((256, 8192), (1, 256), device=cuda, dtype=f16),
                                           None, 0.5).shape,   # K splits merged by tickets
        threshold_ffn.threshold_ffn(x, w_km, None, w_km, None, wd_km, None, "silu", 0.5, 0.1).shape,
        activation_sparse.threshold_linear(x, w_km, None, 0.5, channel_scale=torch.empty(256, device=cuda)).shape,
        threshold_ffn.threshold_ffn(x, w_km, None, w_km, None, wd_km, None, "silu", 0.5, 0.1,
                                    scale_gate=torch.empty(256, device=cuda), scale_up=torch.empty(256, device=cuda),
                                    scale_down=torch.empty(512, device=cuda)).shape,   # criterion weighted
        threshold_ffn.threshold_ffn(x, w_km, None, w_km, None, wd_km, None, "silu", 0.5, 0.1,
                                    one_launch=True).shape,   # the whole FFN in one launch
        threshold_ffn.threshold_ffn(x, w_km, None, w_km, None, wd_km, None, "silu", 0.5, 0.1,
                                    scale_gate=torch.empty(256, device=cuda), scale_up=torch.empty(256, device=cuda),
                                    scale_down=torch.empty(512, device=cuda), one_launch=True).shape,
    ]
print([tuple(s) for s in shapes])
"""


def test_traced_kernel_paths_run_on_fake_cuda_tensors():
    """The kernel wrappers as Inductor traces them (fake CUDA tensors): no data pointer read, no host read-back,
    no cached device tensor. Runs on a CPU-only machine; in a child without TRITON_INTERPRET, so the kernels are
    compiled-mode Triton functions, as on a GPU. (The mask-positioned decode op converts dtypes on the device,
    which fake CUDA tensors cannot do on a CPU-only build of torch: the GPU tests cover it.)"""
    import os
    import subprocess

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _FAKE_CUDA_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str([(2, 8, 64, 64), (2, 8, 64, 64), (2, 8, 1, 64), (2, 8, 1, 64), (2, 8, 1, 64),
                                                        (1, 512), (1, 256), (1, 256), (1, 256), (1, 512),
                                                        (1, 256), (1, 256), (1, 256)])


_INPUT_COPY_SCRIPT = r"""
import functools
import torch
from tests import sm90
sm90.install()
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from sparsecc.codegen import activation_sparse, block_attention, decode_attention, gate_sparse_ffn, threshold_ffn

decode_attention.sm_count = lambda device: 132
s_list, w_list = [4, 0, 2, 1, 4, 4, 0, 0], [16, 0, 8, 8, 16, 16, 0, 0]
cuda, f16 = torch.device("cuda"), torch.float16


def inputs_behind(node):
    # The graph input a kernel argument is (a view of), or None where the graph made it.
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node) \
            and (torch.Tag.view_copy in getattr(node.target, "tags", ()) or getattr(node.target, "is_view", False)):
        node = node.args[0]
    return node.target if node.op == "placeholder" else None


from sparsecc.layouts import streaming_block_table
table = streaming_block_table(4, 16, block=16, seq_q=64, seq_k=64, causal=True)   # host tensors, made before faking
with FakeTensorMode(allow_non_fake_inputs=True):
    x = torch.empty(1, 256, device=cuda, dtype=f16)
    w_km = torch.empty_strided((512, 256), (1, 512), device=cuda, dtype=f16)
    wd_km = torch.empty_strided((256, 512), (1, 256), device=cuda, dtype=f16)
    wg = torch.empty(512, 256, device=cuda, dtype=f16)
    x_long = torch.empty(1, 8192, device=cuda, dtype=f16)
    w_long = torch.empty_strided((256, 8192), (1, 256), device=cuda, dtype=f16)
    s256, s512 = torch.empty(256, device=cuda), torch.empty(512, device=cuda)
    q = torch.empty(2, 8, 64, 64, device=cuda, dtype=f16)
    k = torch.empty(2, 2, 64, 64, device=cuda, dtype=f16)
    qd = torch.empty(2, 8, 1, 64, device=cuda, dtype=f16)
    kl = torch.empty(2, 2, 1024, 64, device=cuda, dtype=f16)
    calls = {
        "threshold_linear": (lambda x, w: activation_sparse.threshold_linear(x, w, None, 0.5), (x, w_km)),
        "threshold_linear K splits": (lambda x, w: activation_sparse.threshold_linear(x, w, None, 0.5),
                                      (x_long, w_long)),
        "threshold_linear weighted": (lambda x, w, s: activation_sparse.threshold_linear(x, w, None, 0.5,
                                                                                         channel_scale=s),
                                      (x, w_km, s256)),
        "gate_sparse_ffn": (lambda x, wg, wd: gate_sparse_ffn.gate_sparse_ffn(x, wg, None, wg, None, wd, None,
                                                                              "silu", 0.5), (x, wg, wd_km)),
    }
    for one in (False, True):
        def ffn(x, w, wd, one=one):
            return threshold_ffn.threshold_ffn(x, w, None, w, None, wd, None, "silu", 0.5, 0.1, one_launch=one)

        def weighted_ffn(x, w, wd, sg, su, sd, one=one):
            return threshold_ffn.threshold_ffn(x, w, None, w, None, wd, None, "silu", 0.5, 0.1, scale_gate=sg,
                                               scale_up=su, scale_down=sd, one_launch=one)

        calls[f"threshold_ffn one_launch={one}"] = (functools.partial(ffn, one=one), (x, w_km, wd_km))
        calls[f"threshold_ffn weighted one_launch={one}"] = (functools.partial(weighted_ffn, one=one),
                                                             (x, w_km, wd_km, s256, s256.clone(), s512))
    x_f, w_f, wd_f = (torch.empty(1, 256, device=cuda, dtype=f16),
                      torch.empty_strided((8192, 256), (1, 8192), device=cuda, dtype=f16),
                      torch.empty_strided((256, 8192), (1, 256), device=cuda, dtype=f16))
    calls["threshold_ffn, down K splits"] = (lambda x, w, wd: threshold_ffn.threshold_ffn(
        x, w, None, w, None, wd, None, "silu", 0.5, 0.1, one_launch=False), (x_f, w_f, wd_f))
    x_w, w_w, wd_w = (torch.empty(1, 8192, device=cuda, dtype=f16),
                      torch.empty_strided((8192, 8192), (1, 8192), device=cuda, dtype=f16),
                      torch.empty_strided((256, 8192), (1, 256), device=cuda, dtype=f16))
    calls["threshold_ffn, D and down K splits"] = (lambda x, w, wd: threshold_ffn.threshold_ffn(
        x, w, None, w, None, wd, None, "silu", 0.5, 0.1, one_launch=False), (x_w, w_w, wd_w))
    w_rows = torch.empty(8192, 256, device=cuda, dtype=f16)   # gate mode reads a neuron's row contiguous
    calls["gate_sparse_ffn, down K splits"] = (lambda x, w, wd: gate_sparse_ffn.gate_sparse_ffn(
        x, w, None, w, None, wd, None, "silu", 0.5), (x_f, w_rows, wd_f))
    calls["streaming prefill"] = (lambda q, k: block_attention.streaming_attention(
        q, k, k, sink=[4], window=[16], scale=0.1, causal=True), (q, k))
    calls["streaming decode, splits"] = (lambda q, k: block_attention.streaming_attention(
        q, k, k, sink=[4], window=[512], scale=0.1, causal=True), (qd, kl))
    sinks = torch.tensor([4, 0, 2, 1, 4, 4, 0, 0], dtype=torch.int32, device=cuda)
    windows = torch.tensor([16, 0, 8, 8, 16, 16, 0, 0], dtype=torch.int32, device=cuda)
    starts = torch.zeros(2, dtype=torch.int32, device=cuda)
    ends = torch.full((2,), 1023, dtype=torch.int32, device=cuda)
    bool_mask = torch.ones(2, 1, 64, 64, dtype=torch.bool, device=cuda)
    add_mask = torch.zeros(2, 1, 1, 1024, dtype=f16, device=cuda)
    calls["block table prefill, lse"] = (lambda q, k: block_attention.launch_prefill(
        q, k, k, None, 0.1, True, True, table=table), (q, k))
    calls["mixed prefill, mask"] = (lambda q, k, m, s, w: block_attention.launch_prefill(
        q, k, k, m, 0.1, True, False, sinks=s, windows=w, table=table), (q, k, bool_mask, sinks, windows))
    calls["streaming prefill, key_start"] = (lambda q, k, s, w, ks: block_attention.launch_prefill(
        q, k, k, None, 0.1, True, False, sinks=s, windows=w, key_start=ks), (q, k, sinks, windows, starts))
    calls["decode per head, query_end, key_start, mask, lse"] = (
        lambda q, k, m, s, w, qe, ks: decode_attention.streaming_decode(
            q, k, k, m, 0.1, True, s, w, return_lse=True, rules=(s_list, w_list), query_end=qe, key_start=ks),
        (qd, kl, add_mask, sinks, windows, ends, starts))
    bool_row = torch.ones(1, 1, 1, 1024, dtype=torch.bool, device=cuda)
    calls["mask ends, additive"] = (lambda m: decode_attention.mask_ends(m, 2, 1024, with_start=True), (add_mask,))
    calls["mask ends, bool row, no start"] = (lambda m: decode_attention.mask_ends(m, 2, 1024, with_start=False),
                                             (bool_row,))
    calls["decode from mask, per head"] = (lambda q, k, m: decode_attention.streaming_decode_from_mask_op(
        q, k, k, m, 0.1, [4, 0, 2, 1, 4, 4, 0, 0], [16, 8, 8, 8, 16, 16, -1, 4]), (qd, kl, add_mask))
    for name, (fn, args) in calls.items():
        graph = make_fx(torch.func.functionalize(fn, remove="mutations_and_views"))(*args).graph
        launches = [n for n in graph.nodes if "triton_kernel_wrapper_functional" in str(n.target)]
        for n in launches:
            bound = n.kwargs["kwargs"]
            for arg in n.kwargs["tensors_to_clone"]:
                behind = inputs_behind(bound[arg]) if isinstance(bound[arg], torch.fx.Node) else None
                if behind:
                    print(f"COPIED {name}: {arg} is input {behind}")
        fills = [n for n in graph.nodes if n.op == "call_function" and any(
            op in str(n.target) for op in ("aten.zeros", "aten.full", "aten.fill", "aten.zero"))]
        print(f"TRACED {name}: {len(launches)} launch(es), {len(fills)} fill(s)")
"""


def test_no_launch_makes_inductor_copy_an_input():
    """Inductor's functionalization copies every tensor its analysis of a kernel's TTIR reads as written, before
    each launch. The analysis takes a ``@triton.jit`` helper's results to depend on all its arguments, so an input
    pointer passed to a helper whose result places a store (x, q, channel scales, per-head rules, positions) read
    as written and the compiled graph copied it on every call. For each traced launch path (fake CUDA tensors,
    sm_90 compile, no GPU) no argument the analysis calls written may be a graph input or a view of one. Also:
    the fused FFNs' down GEMV counters need no fill kernel (their first launch zeroes them)."""
    import os
    import subprocess

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _INPUT_COPY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    traced = {line.split(":")[0][len("TRACED "):]: line.split(": ")[1] for line in lines if line.startswith("TRACED")}
    assert len(traced) == 20 and all(not v.startswith("0 launch") for v in traced.values()), lines
    # The from-mask decode op reads the positions and the padding in one launch, then attends in one
    assert traced["decode from mask, per head"].startswith("2 launch(es)"), traced
    assert not [line for line in lines if line.startswith("COPIED")], lines
    # The down GEMV merges its K splits by ticket: alone its counters are a zero fill in the graph, in the fused FFNs
    # (input and gate mode) their first launch zeroes them (no fill kernel).
    assert traced["threshold_linear K splits"] == "1 launch(es), 1 fill(s)", traced
    assert traced["threshold_ffn, down K splits"] == "2 launch(es), 0 fill(s)", traced
    assert traced["gate_sparse_ffn, down K splits"] == "2 launch(es), 0 fill(s)", traced
    # Stage 1 split over D merges by ticket too: its own counters are the one fill left.
    assert traced["threshold_ffn, D and down K splits"] == "2 launch(es), 1 fill(s)", traced


# ---------------------------------------------------------------- GPU: Inductor launches the kernels

def _inductor_code(compiled, *args):
    from torch._inductor.utils import run_and_get_code
    out, sources = run_and_get_code(compiled, *args)
    return out, "\n".join(sources)


class _DecodeAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


@pytest.mark.gpu
def test_streaming_decode_launches_from_inductors_code():
    import sparsecc

    torch.manual_seed(0)
    b, h, hkv, d, sk, sink, window = 2, 8, 2, 64, 700, 16, 128
    dev = torch.device("cuda")
    q = torch.randn(b, h, 1, d, device=dev, dtype=torch.float16)
    k = torch.randn(b, hkv, sk, d, device=dev, dtype=torch.float16)
    v = torch.randn(b, hkv, sk, d, device=dev, dtype=torch.float16)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "streaming", "sink": sink, "window": window}]}
    compiled = torch.compile(_DecodeAttention(), backend="sparsecc", options={"spec": spec})
    out, code = _inductor_code(compiled, q, k, v)
    sites = [s for s in sparsecc.last_report().sites if s.applied]
    assert sites and sites[0].attrs.get("launch") == "inductor", sites
    assert "torch.ops.sparsecc" not in code and "_decode_split_kernel" in code
    # docs/spec.md, streaming, queries at the end: the one query sits at position sk - 1
    p = sk - 1
    j = torch.arange(sk, device=dev)
    keep = (j < sink) | ((p - j).abs() < window)
    kk, vv = k.double().repeat_interleave(h // hkv, 1), v.double().repeat_interleave(h // hkv, 1)
    logits = (q.double() @ kk.transpose(-1, -2)) * d ** -0.5
    expected = logits.masked_fill(~keep, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("mode", ["input", "gate", "weighted"])
def test_decode_ffn_ops_launch_from_inductors_code(mode, tokens):
    import sparsecc

    torch.manual_seed(0)
    dev = torch.device("cuda")
    ffn = zoo.GatedSiluFFN(hidden=256, inner=512).to(dev, torch.float16).eval()
    x = torch.randn(1, tokens, 256, device=dev, dtype=torch.float16)
    wg, wu, wd = (m.weight.double() for m in (ffn.gate_proj, ffn.up_proj, ffn.down_proj))
    xd = x.double()

    def oracle(tau):
        """docs/spec.md in float64, and the smallest distance of a thresholded value to tau."""
        if mode == "weighted":   # input mode, each projection's input scored by |v_i| * ||W[:, i]||_2
            sg, su, sd = wg.norm(dim=0), wu.norm(dim=0), wd.norm(dim=0)
            hidden = F.silu((xd * (xd.abs() * sg > tau)) @ wg.t()) * ((xd * (xd.abs() * su > tau)) @ wu.t())
            scores = torch.cat([(xd.abs() * sg).flatten(), (xd.abs() * su).flatten(), (hidden.abs() * sd).flatten()])
            return (hidden * (hidden.abs() * sd > tau)) @ wd.t(), (scores - tau).abs().min()
        if mode == "input":   # every thresholded projection input v becomes v * (|v| > tau)
            xk = xd * (xd.abs() > tau)
            hidden = F.silu(xk @ wg.t()) * (xk @ wu.t())
            scores = torch.cat([xd.abs().flatten(), hidden.abs().flatten()])
            return (hidden * (hidden.abs() > tau)) @ wd.t(), (scores - tau).abs().min()
        a = F.silu(xd @ wg.t())   # gate mode: act(x Wg) kept where |act| > tau
        return ((a * (a.abs() > tau)) * (xd @ wu.t())) @ wd.t(), (a.abs() - tau).abs().min()

    # A threshold no value sits near, so fp16 rounding cannot move an element across it.
    tau = next(t / 1000 for t in range(500, 1500, 7) if oracle(t / 1000)[1] > 2e-3)   # (more values at 2 tokens)
    expected = oracle(tau)[0]
    rule = {"form": "activation_threshold", "mode": "gate" if mode == "gate" else "input", "threshold": tau}
    if mode == "weighted":
        rule["criterion"] = "weighted"
    spec = {"version": 1, "defaults": {"policy": "force"}, "ffn": [rule]}
    compiled = torch.compile(ffn, backend="sparsecc", options={"spec": spec})
    with torch.no_grad():
        out, code = _inductor_code(compiled, x)
    sites = [s for s in sparsecc.last_report().sites if s.applied and s.kind == "ffn"]
    assert sites and sites[0].attrs.get("launch") == "inductor", sites
    assert "torch.ops.sparsecc" not in code
    if mode == "gate":
        assert "_gate_up_kernel" in code
    elif tokens == 1 or mode == "input":   # one fused op (passes/ffn.py plans two tokens fused for magnitude only):
        # one token runs the whole FFN in one kernel where that is the default, else two launches
        from sparsecc.codegen.threshold_ffn import ONE_LAUNCH_BY_DEFAULT
        kernels = ("_threshold_ffn_kernel",) if ONE_LAUNCH_BY_DEFAULT and tokens == 1 else (
            "_threshold_gate_up_kernel", "_threshold_gemv_kernel")
        assert all(k in code for k in kernels) and "threshold_ffn" in sites[0].attrs["plan"]
    else:   # the weighted criterion at two tokens: one thresholded GEMV per projection
        assert "_threshold_gemv_kernel" in code and "_threshold_gate_up_kernel" not in code
        assert "one op per projection" in sites[0].attrs["plan"], sites[0].attrs["plan"]
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
