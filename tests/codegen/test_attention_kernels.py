"""Triton attention kernels (prefill + decode) against the references in codegen/block_attention.py.

CPU: the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) at tiny
shapes. Triton decides interpreter-or-compiler when a ``@triton.jit`` function
is decorated, so the ``interpreter`` fixture sets the variable and (re)imports
the kernel modules before any kernel runs, and restores the variable after.
GPU (``gpu`` marker): realistic shapes, fp32 reference of the same layout,
NaN-poisoned outputs, relative error under 1e-2 for bf16.
"""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

from sparsecc.codegen.block_attention import (
    FULL_WINDOW, block_sparse_attention, block_sparse_attention_ref, streaming_attention, streaming_attention_ref)
from sparsecc.forms import BlockSparse
from sparsecc.layouts import BlockTable, block_sparse_table, streaming_block_table
from tests.budgets import examples
from tests.interpreter import interpreter, run_interpreter_checks  # noqa: F401 (the fixture)

KERNEL_MODULES = ("sparsecc.codegen.block_attention_kernels", "sparsecc.codegen.decode_attention")
# The interpreter is slow: few examples per property under ci (the deep profile raises them by DEEP_FACTOR).
FEW = examples(10)
# Output tolerance against the fp32 reference on the same bf16/fp16 inputs: both round the output once
# (bf16: 2^-8 relative), and the kernel also rounds the probabilities to the input dtype before P @ V.
OUT_TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
# lse is computed from fp32 scores in both; only summation order differs.
LSE_TOL = 1e-3


def test_interpreter_checks():
    """Run this file's CPU checks in a child process that imports Triton in interpreter mode."""
    run_interpreter_checks(__file__)




def make_qkv(seed, b, h, hkv, sq, sk, d, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


def make_mask(seed, kind, b, h, sq, sk):
    """None, a bool keep mask or an additive float mask (some -inf), with random broadcast dims."""
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    shape = [b if seed % 2 else 1, h if seed % 3 else 1, sq, sk]
    if kind == "bool":
        return torch.rand(*shape, generator=gen) < 0.8
    m = torch.randn(*shape, generator=gen)
    return m.masked_fill(torch.rand(*shape, generator=gen) < 0.1, -math.inf)


def check(out, lse, ref_out, ref_lse, dtype):
    """Kernel output and lse against the reference: same empty rows, close values, no NaN."""
    assert out.dtype == dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), atol=LSE_TOL, rtol=LSE_TOL)


@st.composite
def shapes(draw, max_s=80):
    h = draw(st.sampled_from([1, 2, 4]))
    hkv = draw(st.sampled_from([x for x in (1, 2, 4) if h % x == 0]))
    sk = draw(st.integers(1, max_s))
    sq = draw(st.one_of(st.just(sk), st.integers(1, sk), st.integers(sk, sk + 20)))
    return dict(b=draw(st.integers(1, 2)), h=h, hkv=hkv, sq=sq, sk=sk, d=draw(st.sampled_from([16, 64, 80])),
                dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])), causal=draw(st.booleans()),
                mask=draw(st.sampled_from(["none", "bool", "float"])), seed=draw(st.integers(0, 10_000)))


# ------------------------------------------------------------------ streaming (prefill and decode)

@FEW
@given(c=shapes(), data=st.data())
def test_streaming_kernel_matches_reference(interpreter, c, data):
    n_rules = data.draw(st.sampled_from([1, c["h"]]))
    sinks = data.draw(st.lists(st.integers(0, 20), min_size=n_rules, max_size=n_rules))
    windows = data.draw(st.lists(st.one_of(st.just(FULL_WINDOW), st.integers(1, 50)),
                                 min_size=n_rules, max_size=n_rules))
    q, k, v = make_qkv(c["seed"], c["b"], c["h"], c["hkv"], c["sq"], c["sk"], c["d"], c["dtype"])
    mask = make_mask(c["seed"], c["mask"], c["b"], c["h"], c["sq"], c["sk"])
    kw = dict(sink=sinks, window=windows, scale=1 / math.sqrt(c["d"]), causal=c["causal"], mask=mask,
              return_lse=True)
    out, lse = streaming_attention(q, k, v, **kw)
    ref_out, ref_lse = streaming_attention_ref(q, k, v, **kw)
    check(out, lse, ref_out, ref_lse, c["dtype"])


@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_streaming_head_dims(interpreter, d):
    q, k, v = make_qkv(d, 1, 2, 1, 37, 45, d, torch.bfloat16)
    kw = dict(sink=[3], window=[11], scale=d ** -0.5, causal=True, return_lse=True)
    check(*streaming_attention(q, k, v, **kw), *streaming_attention_ref(q, k, v, **kw), torch.bfloat16)


@pytest.mark.parametrize("sq", [1, 3, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_decode_kernel_matches_reference(interpreter, sq, causal):
    # Groups of 2 query heads share a kv head and a rule; the two groups have different rules.
    q, k, v = make_qkv(sq, 2, 4, 2, sq, 150, 64, torch.bfloat16)
    mask = make_mask(7, "bool", 2, 4, sq, 150)
    kw = dict(sink=[4, 4, 0, 0], window=[33, 33, FULL_WINDOW, FULL_WINDOW], scale=0.125, causal=causal, mask=mask,
              return_lse=True)
    check(*streaming_attention(q, k, v, **kw), *streaming_attention_ref(q, k, v, **kw), torch.bfloat16)


def test_decode_splits_and_float_mask(interpreter):
    from sparsecc.codegen import decode_attention

    q, k, v = make_qkv(5, 1, 2, 1, 2, 700, 64, torch.float16)
    mask = make_mask(4, "float", 1, 2, 2, 700)
    sinks = torch.tensor([5, 5], dtype=torch.int32)
    windows = torch.tensor([300, 300], dtype=torch.int32)
    out, lse = decode_attention.streaming_decode(q, k, v, mask, 0.1, True,
                                                 sinks, windows, return_lse=True)
    ref = streaming_attention_ref(q, k, v, sink=[5], window=[300], scale=0.1, causal=True, mask=mask,
                                  return_lse=True)
    check(out, lse, *ref, torch.float16)


@pytest.mark.parametrize("n_split", [1, 3, 64])
@pytest.mark.parametrize("sk", [160, 171])   # a multiple of the 16-key interpreter tile, and not
def test_decode_split_counts_merge_in_one_launch(interpreter, n_split, sk):
    """One split stores the output itself; several merge in the launch (the last split of a kv head to finish).

    64 asks for more splits than there are kept blocks (capped at one per two). Each call must leave the ticket
    counters zeroed, so a second call on the same buffers gives the same answer.
    """
    from sparsecc.codegen import decode_attention as da, launch

    sq = 2
    q, k, v = make_qkv(n_split + sk, 2, 4, 2, sq, sk, 64, torch.bfloat16)
    mask = make_mask(3, "bool", 2, 4, sq, sk)
    sinks, windows = torch.tensor([5] * 4, dtype=torch.int32), torch.tensor([70] * 4, dtype=torch.int32)
    config = dataclasses.replace(da.INTERPRETER_CONFIG, n_split=n_split)
    ref = streaming_attention_ref(q, k, v, sink=[5], window=[70], scale=0.125, causal=True, mask=mask,
                                  return_lse=True)
    for _ in range(2):
        out, lse = da.streaming_decode(q, k, v, mask, 0.125, True, sinks, windows, return_lse=True,
                                       out=torch.full_like(q, float("nan")), config=config)
        check(out, lse, *ref, torch.bfloat16)
        assert all(int(buf.count_nonzero()) == 0 for bufs in launch._COUNTERS.values() for buf in bufs)


def test_decode_many_splits_merge_in_chunks(interpreter):
    """More splits than one merge load takes (16 here): the merge walks them in chunks."""
    from sparsecc.codegen import decode_attention as da

    q, k, v = make_qkv(8, 1, 4, 1, 1, 720, 64, torch.bfloat16)
    config = dataclasses.replace(da.INTERPRETER_CONFIG, n_split=30)
    kw = dict(sink=[20], window=[650], scale=0.125, causal=True, return_lse=True)
    out, lse = da.streaming_decode(q, k, v, None, 0.125, True, None, None, return_lse=True,
                                   rules=([20] * 4, [650] * 4), config=config)
    assert da._plan_splits(1, da._kept_blocks(20, 650, 1, 720, True, 16), 1, config)[0] > 16
    check(out, lse, *streaming_attention_ref(q, k, v, **kw), torch.bfloat16)


def test_decode_query_end_leaves_empty_splits(interpreter):
    """Positions from the device: splits past a batch element's kept blocks store empty partials, which merge to
    nothing. Each element's answer is one query row at its position over the keys up to it."""
    from sparsecc.codegen import decode_attention as da

    b, sk = 3, 300
    q, k, v = make_qkv(21, b, 4, 1, 1, sk, 64, torch.float16)
    ends = [299, 120, 40]
    config = dataclasses.replace(da.INTERPRETER_CONFIG, n_split=6)
    out = da.streaming_decode(q, k, v, None, 0.1, True, None, None, rules=([8] * 4, [50] * 4),
                              query_end=torch.tensor(ends, dtype=torch.int32), config=config)
    for i, e in enumerate(ends):
        ref = streaming_attention_ref(q[i:i + 1], k[i:i + 1, :, :e + 1], v[i:i + 1, :, :e + 1], sink=[8],
                                      window=[50], scale=0.1, causal=True)
        torch.testing.assert_close(out[i:i + 1].float(), ref.float(), atol=OUT_TOL[torch.float16],
                                   rtol=OUT_TOL[torch.float16])


@pytest.mark.parametrize("sq, sk, pads", [(40, 40, (0, 5, 19)), (3, 50, (17, 0, 49)), (1, 70, (0, 33, 64)),
                                          (1, 300, (250, 7, 0))])
def test_streaming_kernels_count_positions_from_left_padding(interpreter, sq, sk, pads):
    """docs/spec.md, "Left padding": each element's sink starts after the keys its mask hides from every row, on
    the prefill kernel, the decode kernel and the static-cache decode op; padding that ends inside a key tile or
    past the window. Expected values: the float64 oracle written from docs/spec.md."""
    from sparsecc.codegen import decode_attention as da
    from tests.oracle import harness as hn
    from tests.oracle import oracle

    h, hkv, sink, window, scale = 4, 2, 3, 7, 0.25
    q, k, v = make_qkv(31, len(pads), h, hkv, sq, sk, 16, torch.float16)
    keep = torch.ones(len(pads), 1, sq, sk, dtype=torch.bool).tril(sk - sq)
    for i, pad in enumerate(pads):
        keep[i, ..., :pad] = False
    forms = [{"form": "streaming", "sink": sink, "window": window}] * h
    expected, valid = oracle.expected_attention(q, k, v, forms, causal=True, mask=keep, scale=scale,
                                                is_causal_flag=False)
    assert valid.any()
    out = streaming_attention(q, k, v, sink=[sink], window=[window], scale=scale, causal=False, mask=keep)
    hn.assert_rows_close(out, expected, valid, torch.float16, what="streaming_attention")
    if sq == 1:   # a static cache's decode step: the kernel with the position read from the mask
        out = da.streaming_decode_from_mask_op(q, k, v, keep, scale, [sink], [window])
        hn.assert_rows_close(out, expected, valid, torch.float16, what="streaming_decode_from_mask_op")


# Per query head (H = 8, 2 kv groups of 4): rules that differ inside a kv group, a dense head among streaming ones,
# a sink wider than another head's window; each case's expected value is the float64 oracle's per-head keep-mask.
_GROUP_RULES = {
    "windows": [dict(sink=2, window=w) for w in (40, 9, 40, 17)] * 2,
    "sinks and windows": [dict(sink=s_, window=w) for s_, w in ((0, 60), (30, 5), (4, 25), (12, 12),
                                                                 (4, 25), (4, 25), (4, 25), (4, 25))],
    "a dense head": [None, dict(sink=3, window=20), dict(sink=3, window=20), dict(sink=0, window=7)] * 2,
}


@pytest.mark.parametrize("case", sorted(_GROUP_RULES))
@pytest.mark.parametrize("call, sq", [("causal", 1), ("causal", 3), ("mask positions", 1),
                                      ("mask positions, additive", 1), ("left padding", 1), ("left padding", 3)])
def test_decode_kernel_takes_rules_that_differ_within_a_kv_group(interpreter, monkeypatch, case, call, sq):
    """Heads of one kv group with different sinks and windows (dense heads among them) run the split-KV decode
    kernel, which reads the group's K/V once and masks each row to its own head's rule: the kernel is launched, and
    every row equals the float64 oracle of docs/spec.md's per-head keep-mask, with the queries at the end of the
    keys (causal), at the position the mask gives (a static cache, one row) or after each element's left padding."""
    from sparsecc.codegen import decode_attention as da
    from tests.oracle import harness as hn
    from tests.oracle import oracle

    launched = []
    real_launcher = da.launcher
    monkeypatch.setattr(da, "launcher", lambda kernel, like: (
        launched.append(getattr(kernel, "fn", kernel).__name__), real_launcher(kernel, like))[1])
    b, h, hkv, sk, scale = 2, 8, 2, 150, 0.25
    rules = _GROUP_RULES[case]
    forms = [None if r is None else {"form": "streaming", **r} for r in rules]
    sinks = [0 if r is None else r["sink"] for r in rules]
    windows = [FULL_WINDOW if r is None else r["window"] for r in rules]
    q, k, v = make_qkv(len(launched) + sq, b, h, hkv, sq, sk, 32, torch.float16)
    if call == "causal":
        expected, valid = oracle.expected_attention(q, k, v, forms, causal=True, scale=scale)
        out = streaming_attention(q, k, v, sink=sinks, window=windows, scale=scale, causal=True)
    else:
        keep = torch.ones(b, 1, sq, sk, dtype=torch.bool)
        if call.startswith("mask positions"):   # a static cache filled to 101 and 130 keys: its tail is masked
            for i, filled in enumerate((101, 130)):
                keep[i, ..., filled:] = False
        else:                           # left padding of 0 and 37 keys, causal rows at the end
            keep = keep.tril(sk - sq)
            keep[1, ..., :37] = False
        expected, valid = oracle.expected_attention(q, k, v, forms, causal=True, mask=keep, scale=scale,
                                                    is_causal_flag=False)
        if call.startswith("mask positions"):
            mask = keep
            if call.endswith("additive"):   # HF's additive form: 0 where kept, the dtype's lowest value elsewhere
                mask = torch.zeros(keep.shape, dtype=torch.float16).masked_fill(~keep, torch.finfo(torch.float16).min)
            out = da.streaming_decode_from_mask_op(q, k, v, mask, scale, sinks, windows)
        else:
            out = streaming_attention(q, k, v, sink=sinks, window=windows, scale=scale, causal=False, mask=keep)
    # the from-mask op reads the query positions and the padding from the mask in a launch of its own first
    assert launched == ["_mask_ends_kernel"] * call.startswith("mask positions") + ["_decode_split_kernel"], launched
    assert valid.any()
    hn.assert_rows_close(out, expected, valid, torch.float16, what=f"{case}, {call}")


@pytest.mark.parametrize("mask_kind", ["bool", "float64", "float32", "bfloat16", "float16"])
def test_mask_ends_reads_positions_and_padding_as_docs_say(interpreter, mask_kind):
    """docs/spec.md: one query row sits at the last key its mask keeps (``Sk - 1`` when it keeps none), and its
    element's left padding ends at the first kept key (``Sk`` when none). Expected values by hand from the keep
    rows; float masks keep a key whose value is above -1e4, compared in the mask's dtype (-1e4 written into the
    mask: masked, in bfloat16 too, where it is stored as -9984; -9000: kept); a mask shared by the batch, and one
    broadcast along the keys."""
    from sparsecc.codegen import decode_attention as da

    sk = 2500   # past one interpreter block of 1024 keys
    keep = torch.zeros(4, 1, 1, sk, dtype=torch.bool)
    keep[0, ..., 7:1300] = True            # left padding 7, a static cache filled to 1300
    keep[1, ..., 0] = True                 # one key
    keep[2, ..., [1030, 2499]] = True      # two keys in different blocks
    # element 3 keeps nothing
    expected_end = torch.tensor([1299, 0, 2499, sk - 1], dtype=torch.int32)
    expected_start = torch.tensor([7, 0, 1030, sk], dtype=torch.int32)
    if mask_kind == "bool":
        mask = keep
    else:
        dtype = getattr(torch, mask_kind)
        mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, -1.0e4)
        mask[0, ..., 7] = -9.0e3                           # above it: kept
        mask[0, ..., 6] = torch.finfo(dtype).min           # far below: masked
        if dtype in (torch.float64, torch.float32):   # the next value above -1e4 is kept: element 1 now ends at 5
            mask[1, ..., 5] = torch.nextafter(torch.tensor(-1.0e4, dtype=dtype), torch.tensor(0.0, dtype=dtype))
            expected_end[1] = 5

    def ends(m, batch, with_start=True):   # the parts reduced as mask_ends documents: largest / smallest part
        last, first = da.mask_ends(m, batch, sk, with_start=with_start)
        assert last.dtype == torch.int32 and last.shape[0] == batch and last.shape[1] > 1   # several stretches
        position = torch.where(last.amax(1) >= 0, last.amax(1), sk - 1)
        return position, (None if first is None else first.amin(1))

    end, start = ends(mask, 4)
    assert torch.equal(end, expected_end) and torch.equal(start, expected_start), (end, start)
    end_only, none = ends(mask, 4, with_start=False)
    assert none is None and torch.equal(end_only, expected_end)
    # one mask row for the whole batch, and a mask of one key broadcast along all of them
    end, start = ends(mask[2:3], 3)
    assert end.tolist() == [2499] * 3 and start.tolist() == [1030] * 3
    end, start = ends(keep[1:2, ..., :1], 2)
    assert end.tolist() == [sk - 1] * 2 and start.tolist() == [0] * 2
    with pytest.raises(ValueError, match=r"\[B\|1, 1, 1, Sk\|1\] mask"):
        da.mask_ends(torch.ones(4, 2, 1, sk, dtype=torch.bool), 4, sk, with_start=True)


_SM90_CHILD = """
import torch
from tests import sm90
sm90.install()
from sparsecc.codegen import block_attention as ba, decode_attention as da

class Compile:   # stands in for launch.launcher: compiles for sm_90 instead of launching
    def __init__(self, kernel):
        self.kernel = kernel
    def __getitem__(self, grid):
        def run(*args, **kwargs):
            k = self.kernel.warmup(*args, grid=grid if isinstance(grid, tuple) else (1, 1, 1), **kwargs)
            print("COMPILED", self.kernel.fn.__name__, "HAS_KEY0" if kwargs.get("HAS_KEY0") else "-",
                  "ROW_RULES" if kwargs.get("ROW_RULES") else "PER_HEAD" if kwargs.get("PER_HEAD") else "-",
                  len(k.asm["cubin"]))
        return run

ba.launcher = da.launcher = lambda kernel, like: Compile(kernel)
B, H, HKV, S, D = 2, 8, 2, 1024, 128
q, k = torch.empty(B, H, S, D, dtype=torch.bfloat16), torch.empty(B, HKV, S, D, dtype=torch.bfloat16)
starts = torch.zeros(B, dtype=torch.int32)
sinks, windows = ba.rule_vectors((64,) * H, (256,) * H, q)
for key_start in (None, starts):
    ba.launch_prefill(q, k, k, torch.ones(B, 1, S, S, dtype=torch.bool), 0.1, False, False, sinks=sinks,
                      windows=windows, key_start=key_start,
                      config=dict(BLOCK_M=128, BLOCK_N=64, USE_TMA=False, num_warps=8, num_stages=3))
    # one rule for every head, one per kv group, then rules that differ within each kv group (each row reads its own)
    for rules in (([64] * H, [256] * H), ([64] * 4 + [0] * 4, [256] * 4 + [16] * 4),
                  ([64, 0, 8, 64] * 2, [256, 2048, 32, 16] * 2)):
        da.streaming_decode(q[:, :, :1], k, k, torch.ones(B, 1, 1, S, dtype=torch.bool), 0.1, True, None, None,
                            rules=rules, query_end=torch.full((B,), S - 1, dtype=torch.int32), key_start=key_start)
da.mask_ends(torch.ones(B, 1, 1, S, dtype=torch.bool), B, S, with_start=True)   # the from-mask op's positions
"""


def test_kernels_compile_for_sm90_with_and_without_left_padding():
    """The prefill and decode kernels compile for sm_90 with the installed Triton (no GPU: tests/sm90.py), with and
    without the left-padding offset (the decode kernel also with a rule per kv group and with rules per query head),
    so a GPU never sees a kernel variant only the interpreter ran."""
    pytest.importorskip("triton.backends.nvidia.driver")
    import os
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", _SM90_CHILD], capture_output=True, text=True, env=env,
                          timeout=600, cwd=root)
    compiled = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("COMPILED")]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted((name, flag, rules) for name, flag, rules, _ in compiled) == [
        ("_decode_split_kernel", "-", "-"), ("_decode_split_kernel", "-", "PER_HEAD"),
        ("_decode_split_kernel", "-", "ROW_RULES"),
        ("_decode_split_kernel", "HAS_KEY0", "-"), ("_decode_split_kernel", "HAS_KEY0", "PER_HEAD"),
        ("_decode_split_kernel", "HAS_KEY0", "ROW_RULES"),
        ("_mask_ends_kernel", "-", "-"), ("_prefill_kernel", "-", "-"), ("_prefill_kernel", "HAS_KEY0", "-")]
    assert all(int(size) > 0 for *_, size in compiled)


def test_gqa_maps_query_heads_like_repeat_interleave(interpreter):
    # kv head 0 has v = 0, kv head 1 has v ~ 100: a wrong head mapping cannot pass.
    b, h, hkv, s, d = 1, 4, 2, 40, 64
    q, k, _ = make_qkv(3, b, h, hkv, s, s, d, torch.bfloat16)
    v = torch.stack([torch.zeros(b, s, d), 100 + torch.randn(b, s, d)], dim=1).to(torch.bfloat16)
    table = block_sparse_table(BlockSparse(block=16, local_blocks=2), h, s, s, causal=True)
    outs = [streaming_attention(q, k, v, sink=[2], window=[9], scale=0.1, causal=True),
            streaming_attention(q[:, :, -1:], k, v, sink=[2], window=[9], scale=0.1, causal=True),  # decode
            block_sparse_attention(q, k, v, table=table, scale=0.1)]
    for o in outs:
        assert torch.all(o[:, :2].abs() < 1e-6)
        assert torch.all(o[:, 2:] > 90)


def test_rows_without_keys_output_zero(interpreter):
    q, k, v = make_qkv(0, 1, 2, 1, 40, 20, 64, torch.bfloat16)  # Sq > Sk, causal: 20 rows see nothing
    out, lse = streaming_attention(q, k, v, sink=[1], window=[4], scale=1.0, causal=True, return_lse=True)
    assert torch.all(out[:, :, :20] == 0) and torch.all(torch.isneginf(lse[:, :, :20]))
    check(out, lse, *streaming_attention_ref(q, k, v, sink=[1], window=[4], scale=1.0, causal=True,
                                             return_lse=True), torch.bfloat16)


# ------------------------------------------------------------------ block tables

@FEW
@given(c=shapes(max_s=100), data=st.data())
def test_table_kernel_matches_reference(interpreter, c, data):
    block = data.draw(st.sampled_from([16, 32]))
    form = BlockSparse(block, local_blocks=data.draw(st.integers(1, 2)), global_blocks=data.draw(st.integers(0, 1)),
                       random_blocks=data.draw(st.integers(0, 2)), seed=c["seed"])
    table = block_sparse_table(form, c["h"], c["sq"], c["sk"], c["causal"])
    q, k, v = make_qkv(c["seed"], c["b"], c["h"], c["hkv"], c["sq"], c["sk"], c["d"], c["dtype"])
    mask = make_mask(c["seed"], c["mask"], c["b"], c["h"], c["sq"], c["sk"])
    kw = dict(table=table, scale=1 / math.sqrt(c["d"]), mask=mask, return_lse=True)
    check(*block_sparse_attention(q, k, v, **kw), *block_sparse_attention_ref(q, k, v, **kw), c["dtype"])


@pytest.mark.parametrize("kind", ["streaming_table", "dense_table", "batch_table", "block_32x16"])
def test_table_layout_kinds(interpreter, kind):
    b, h, sq, sk = 2, 2, 45, 60
    if kind == "streaming_table":
        table = streaming_block_table([3, 0], [20, FULL_WINDOW], block=16, seq_q=sq, seq_k=sk, causal=True)
    elif kind == "dense_table":
        table = block_sparse_table(BlockSparse(16, local_blocks=10), 1, sq, sk, causal=False)
    elif kind == "batch_table":
        kept = torch.rand(b, 1, 3, 4, generator=torch.Generator().manual_seed(1)) < 0.6
        table = BlockTable.from_dense(kept, torch.zeros_like(kept), block_q=16, block_k=16, seq_q=sq, seq_k=sk,
                                      causal=False)
    else:
        kept = torch.ones(1, 1, 2, 4, dtype=torch.bool)
        table = BlockTable.from_dense(kept, torch.zeros_like(kept), block_q=32, block_k=16, seq_q=sq, seq_k=sk,
                                      causal=True)
    q, k, v = make_qkv(11, b, h, 1, sq, sk, 64, torch.bfloat16)
    kw = dict(table=table, scale=0.125, return_lse=True)
    check(*block_sparse_attention(q, k, v, **kw), *block_sparse_attention_ref(q, k, v, **kw), torch.bfloat16)


# ------------------------------------------------------------------ routing and registration

def test_fp32_and_odd_blocks_run_the_reference():
    q, k, v = make_qkv(2, 1, 2, 1, 20, 20, 16, torch.float32)
    kw = dict(sink=[2], window=[5], scale=0.25, causal=True)
    assert torch.equal(streaming_attention(q, k, v, **kw), streaming_attention_ref(q, k, v, **kw))
    table = block_sparse_table(BlockSparse(8, local_blocks=1), 2, 20, 20, causal=True)  # 8 < 16: no kernel
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    assert torch.equal(block_sparse_attention(qb, kb, vb, table=table, scale=0.25),
                       block_sparse_attention_ref(qb, kb, vb, table=table, scale=0.25))


def test_ops_table_registers_attention_kernels():
    from sparsecc.codegen import ops
    from sparsecc.codegen.block_attention import block_sparse_attention_op, streaming_attention_op

    pytest.importorskip("triton")
    assert ops.triton_kernel("streaming_attention", torch.device("cuda")) is streaming_attention_op
    assert ops.triton_kernel("block_sparse_attention", torch.device("cuda")) is block_sparse_attention_op
    assert ops.triton_kernel("streaming_attention", torch.device("cpu")) is None


def test_importing_sparsecc_loads_no_kernel_module():
    code = ("import sys, sparsecc, sparsecc.codegen.ops, sparsecc.codegen.block_attention; "
            "print(any(m in sys.modules for m in %r))" % (KERNEL_MODULES,))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


# ------------------------------------------------------------------ GPU

def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def poisoned(q):
    return torch.full_like(q, float("nan"))


@pytest.mark.gpu
@pytest.mark.parametrize("hkv", [8, 32])
@pytest.mark.parametrize("s,sink,window", [(4096, 128, 1024), (3000, 64, 700), (2048, 0, FULL_WINDOW)])
def test_gpu_streaming_prefill(hkv, s, sink, window):
    q, k, v = make_qkv(s, 1, 32, hkv, s, s, 128, torch.bfloat16, "cuda")
    kw = dict(sink=[sink], window=[window], scale=128 ** -0.5, causal=True)
    ref = streaming_attention_ref(q.float(), k.float(), v.float(), **kw)
    out = streaming_attention(q, k, v, out=poisoned(q), **kw)
    assert not out.isnan().any() and rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 80, 96, 256])
def test_gpu_streaming_head_dims_and_chunked_prefill(d):
    q, k, v = make_qkv(d, 2, 8, 2, 1000, 2500, d, torch.bfloat16, "cuda")
    mask = (torch.rand(2, 1, 1000, 2500, device="cuda") < 0.9)
    kw = dict(sink=[16] * 4 + [0] * 4, window=[512] * 4 + [FULL_WINDOW] * 4, scale=d ** -0.5, causal=True, mask=mask)
    ref = streaming_attention_ref(q.float(), k.float(), v.float(), **kw)
    out = streaming_attention(q, k, v, out=poisoned(q), **kw)
    assert not out.isnan().any() and rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_block_table(causal):
    s = 4096 + 77
    table = block_sparse_table(BlockSparse(128, local_blocks=2, global_blocks=1, random_blocks=3, seed=1), 16, s, s,
                               causal, device="cuda")
    q, k, v = make_qkv(5, 1, 16, 4, s, s, 128, torch.bfloat16, "cuda")
    ref = block_sparse_attention_ref(q.float(), k.float(), v.float(), table=table, scale=0.088)
    out = block_sparse_attention(q, k, v, table=table, scale=0.088, out=poisoned(q))
    assert not out.isnan().any() and rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("sq,hkv", [(1, 32), (1, 8), (4, 8), (16, 4)])
def test_gpu_decode(sq, hkv):
    q, k, v = make_qkv(sq, 4, 32, hkv, sq, 20000, 128, torch.bfloat16, "cuda")
    kw = dict(sink=[128], window=[4096], scale=128 ** -0.5, causal=True)
    ref = streaming_attention_ref(q.float(), k.float(), v.float(), **kw)
    out = streaming_attention(q, k, v, out=poisoned(q), **kw)
    assert not out.isnan().any() and rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("sq", [1, 4])
def test_gpu_decode_rules_that_differ_within_a_kv_group(sq, monkeypatch):
    """Four query heads per kv head with four rules (a dense head, a long sink, two windows): the decode kernel
    runs and matches the float32 reference of the same per-head rules."""
    from sparsecc.codegen import decode_attention as da

    launched = []
    real_launcher = da.launcher
    monkeypatch.setattr(da, "launcher", lambda kernel, like: (launched.append(kernel.fn.__name__),
                                                              real_launcher(kernel, like))[1])
    q, k, v = make_qkv(sq + 40, 4, 32, 8, sq, 20000, 128, torch.bfloat16, "cuda")
    kw = dict(sink=[0, 1024, 128, 128] * 8, window=[FULL_WINDOW, 16, 4096, 1024] * 8, scale=128 ** -0.5,
              causal=True)
    ref = streaming_attention_ref(q.float(), k.float(), v.float(), **kw)
    out = streaming_attention(q, k, v, out=poisoned(q), **kw)
    assert launched == ["_decode_split_kernel"], launched
    assert not out.isnan().any() and rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["streaming", "table"])
def test_gpu_prefill_every_autotune_config(layout):
    """Each autotuner candidate of the prefill kernel, TMA loads included, computes the same attention.

    The suite keeps every autotuner's first config (SPARSECC_AUTOTUNE=first in tests/conftest.py), but a tuned
    run may pick any candidate, so each is launched once here on ragged tiles (1000 rows). A candidate that does
    not fit the GPU (Triton's OutOfResources) is one the autotuner drops too; at least one must run.
    """
    from triton.runtime.errors import OutOfResources

    from sparsecc.codegen import block_attention as ba
    from sparsecc.codegen import block_attention_kernels as kern

    d, s, scale = 128 if layout == "streaming" else 64, 1000, 0.09
    q, k, v = make_qkv(17, 1, 8, 2, s, s, d, torch.bfloat16, "cuda")
    if layout == "streaming":
        kw = dict(sinks=ba.rule_vectors((16,) * 8, (300,) * 8, q)[0],
                  windows=ba.rule_vectors((16,) * 8, (300,) * 8, q)[1])
        ref = streaming_attention_ref(q.float(), k.float(), v.float(), sink=[16], window=[300], scale=scale,
                                      causal=True)
        configs = kern._configs(128, tma=kern.tma_supported(k, v))
        assert any(c.kwargs["USE_TMA"] for c in configs), "an H100/H200 offers TMA configs"
    else:
        table = block_sparse_table(BlockSparse(128, local_blocks=2, global_blocks=1, random_blocks=1, seed=3), 8,
                                   s, s, True, device="cuda")
        kw = dict(table=table)
        ref = block_sparse_attention_ref(q.float(), k.float(), v.float(), table=table, scale=scale)
        configs = kern._configs(64, 128, 128)
    ran = 0
    for cfg in configs:
        config = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        try:
            out = ba.launch_prefill(q, k, v, None, scale, True, False, out=poisoned(q), config=config, **kw)
        except OutOfResources:
            continue
        ran += 1
        assert not out.isnan().any() and rel_err(out, ref) < 1e-2, config
    assert ran > 0
