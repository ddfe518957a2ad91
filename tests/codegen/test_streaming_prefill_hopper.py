"""The Gluon streaming prefill kernel for Hopper (codegen/streaming_prefill_hopper.py) against the float64 oracle.

Gluon has no interpreter path, so the numbers are checked on an sm_90 GPU only (``gpu``). Expected values come
from docs/spec.md's streaming rule through tests/oracle (an explicit boolean keep mask, softmax in float64),
never from sparsecc. The argument checks and the TMA stride handling run on CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.oracle import oracle

def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def needs_hopper(test):
    """A ``gpu`` test that runs on sm_90 only."""
    return pytest.mark.gpu(pytest.mark.skipif(not _hopper(), reason="the Gluon kernel targets sm_90")(test))


def _expected(q, k, v, sink, window, scale):
    """softmax(q kᵀ · scale over the kept keys) v in float64, GQA by repeating kv heads."""
    sq, sk = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(rep, dim=1)
    v64 = v.double().repeat_interleave(rep, dim=1)
    keep = oracle.streaming_keep(sq, sk, sink, window, causal=True).to(q.device)
    scores = (q.double() @ k64.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~keep.any(-1, keepdim=True), 0.0)   # no kept key: zeros
    return probs @ v64


def _rel(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


# (B, H, Hkv, Sq, Sk, sink, window, dtype): aligned and ragged lengths, chunked prefill (Sq < Sk), GQA, no sink,
# a window wider than the sequence, windows narrower than one 128-key block, a sink that is not block-aligned,
# more queries than keys with a window near 2**31.
CASES = [
    (1, 4, 2, 1024, 1024, 64, 256, torch.bfloat16),
    (2, 8, 8, 1000, 1000, 100, 300, torch.float16),
    (1, 4, 4, 640, 1536, 128, 512, torch.bfloat16),
    (1, 2, 1, 777, 777, 0, 5000, torch.bfloat16),
    (1, 4, 2, 513, 513, 3, 50, torch.float16),
    (2, 4, 1, 300, 2100, 200, 129, torch.bfloat16),
    (1, 2, 1, 300, 200, 5, 2 ** 31 - 1, torch.bfloat16),   # Sq > Sk (rows before the keys: zeros), huge window
]


# The software-pipelined program at 2 and 3 stages, the warp-specialised one, and that one with ping-pong.
VARIANTS = [dict(stages=2), dict(stages=3), dict(stages=2, warp_specialized=True),
            dict(stages=3, warp_specialized=True), dict(stages=2, warp_specialized=True, pingpong=True),
            dict(stages=3, warp_specialized=True, pingpong=True)]
VARIANT_IDS = ["s2", "s3", "ws2", "ws3", "pp2", "pp3"]


# Every case runs each program at 3 stages; the 2-stage rings (the same code with one constant changed) run on
# the cases with ragged lengths and chunked prefill. Each (program, stages, dtype) is one Gluon compile, and the
# whole GPU suite must finish in one device call.
PAIRS = ([(case, variant) for case in CASES for variant in VARIANTS[1::2]]
         + [(case, variant) for case in (CASES[1], CASES[2], CASES[5]) for variant in VARIANTS[0::2]])


@needs_hopper
@pytest.mark.parametrize("case, variant", PAIRS,
                         ids=[f"{c[3]}x{c[4]}-{VARIANT_IDS[VARIANTS.index(v)]}" for c, v in PAIRS])
def test_matches_oracle(case, variant):
    b, h, hkv, sq, sk, sink, window, dtype = case
    from sparsecc.codegen.streaming_prefill_hopper import streaming_prefill_hopper

    g = torch.Generator(device="cuda").manual_seed(sq * 7 + sk)
    q = torch.randn(b, h, sq, 128, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, hkv, sk, 128, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, hkv, sk, 128, device="cuda", dtype=dtype, generator=g)
    out = streaming_prefill_hopper(q, k, v, sink, window, 0.09, **variant)
    ref = _expected(q, k, v, sink, window, 0.09)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-2
    if sink + window < sk:   # the rule drops keys here: the full causal softmax differs from the oracle
        dense = _expected(q, k, v, sk, sk, 0.09)
        assert _rel(dense, ref) > 1e-2


@needs_hopper
@pytest.mark.parametrize("variant", VARIANTS[1::2], ids=VARIANT_IDS[1::2])
def test_batch_mates_do_not_matter(variant):
    """A sequence's output is the same alone and beside another sequence (bit for bit: same programs)."""
    from sparsecc.codegen.streaming_prefill_hopper import streaming_prefill_hopper

    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(2, 4, 700, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, 2, 700, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(2, 2, 700, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    both = streaming_prefill_hopper(q, k, v, 64, 200, **variant)
    alone = streaming_prefill_hopper(q[1:].contiguous(), k[1:].contiguous(), v[1:].contiguous(), 64, 200,
                                     **variant)
    assert torch.equal(both[1:], alone)


# The persistent warp-specialised programs (one program per SM, several tiles each).
PERSISTENT = [dict(stages=3, warp_specialized=True, persistent=True),
              dict(stages=2, warp_specialized=True, pingpong=True, persistent=True),
              dict(stages=3, warp_specialized=True, pingpong=True, persistent=True)]   # the dispatched one
PERSISTENT_IDS = ["ws3p", "pp2p", "pp3p"]
# Sq - Sk >= 128: whole query tiles before the first key, which have no trip, between tiles that have some.
NO_TRIP_CASE = (1, 2, 1, 600, 200, 5, 64, torch.bfloat16)


@needs_hopper
@pytest.mark.parametrize("programs", [3, 7])
@pytest.mark.parametrize("variant", PERSISTENT, ids=PERSISTENT_IDS)
def test_persistent_programs_match_oracle(variant, programs, monkeypatch):
    """A grid of 3 or 7 programs (the SM count patched down), so each runs many tiles with different trip counts
    (the first query blocks keep fewer keys) and its ring's stages and phases wrap inside and across tiles, on
    the oracle's cases with ragged lengths, chunked prefill, GQA and Sq > Sk, one with tiles that have no trip."""
    from sparsecc.codegen import streaming_prefill_hopper as sp

    monkeypatch.setattr(sp, "sm_count", lambda device: programs)
    for b, h, hkv, sq, sk, sink, window, dtype in (CASES[1], CASES[2], CASES[5], CASES[6], NO_TRIP_CASE):
        g = torch.Generator(device="cuda").manual_seed(sq + sk)
        q = torch.randn(b, h, sq, 128, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(b, hkv, sk, 128, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(b, hkv, sk, 128, device="cuda", dtype=dtype, generator=g)
        out = sp.streaming_prefill_hopper(q, k, v, sink, window, 0.09, **variant)
        assert torch.isfinite(out).all()
        assert _rel(out, _expected(q, k, v, sink, window, 0.09)) < 1e-2, (sq, sk, sink, window)


@needs_hopper
@pytest.mark.parametrize("variant", PERSISTENT[::2], ids=PERSISTENT_IDS[::2])
def test_persistent_grid_of_the_gpu(variant):
    """The device's own SM count, with more tiles than SMs (32 heads x 32 query blocks), equals the one-tile-per-
    program launch bit for bit (the same arithmetic per tile) and the oracle."""
    from sparsecc.codegen.streaming_prefill_hopper import streaming_prefill_hopper

    g = torch.Generator(device="cuda").manual_seed(21)
    q = torch.randn(1, 32, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    out = streaming_prefill_hopper(q, k, v, 128, 1024, 0.09, **variant)
    one_each = streaming_prefill_hopper(q, k, v, 128, 1024, 0.09, **dict(variant, persistent=False))
    assert torch.equal(out, one_each)
    assert _rel(out[:, :4], _expected(q[:, :4], k[:, :1], v[:, :1], 128, 1024, 0.09)) < 1e-2


def _expected_per_head(q, k, v, sinks, windows, scale):
    """``_expected`` head by head, each with its own rule (query head h reads kv head h // (H / Hkv))."""
    rep = q.shape[1] // k.shape[1]
    return torch.cat([_expected(q[:, h:h + 1], k[:, h // rep:h // rep + 1], v[:, h // rep:h // rep + 1], s_, w_,
                                scale) for h, (s_, w_) in enumerate(zip(sinks, windows))], dim=1)


# Per query head, within each kv group of 2 (H = 8, Hkv = 4): windows of 100 and 700 keys, sinks of 0 and 300, a
# head whose window covers every key (dense), a window under one block beside one over several.
HEAD_SINKS = [64, 64, 0, 300, 16, 16, 128, 0]
HEAD_WINDOWS = [100, 700, 2 ** 20, 64, 5, 900, 128, 1000]


@needs_hopper
@pytest.mark.parametrize("variant", VARIANTS[1::2] + PERSISTENT[2:], ids=VARIANT_IDS[1::2] + PERSISTENT_IDS[2:])
def test_rules_per_head_match_oracle(variant, monkeypatch):
    """One sink and window per query head, different inside each kv group: every head equals the float64 oracle
    of its own rule, ragged lengths and chunked prefill; the persistent program on 7 programs, so each runs tiles
    of several heads (different trip counts and rules) through one ring."""
    from sparsecc.codegen import streaming_prefill_hopper as sp

    monkeypatch.setattr(sp, "sm_count", lambda device: 7)
    for sq, sk, dtype in ((1000, 1000, torch.bfloat16), (640, 1500, torch.float16)):
        g = torch.Generator(device="cuda").manual_seed(sq + sk + 1)
        q = torch.randn(2, 8, sq, 128, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(2, 4, sk, 128, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(2, 4, sk, 128, device="cuda", dtype=dtype, generator=g)
        out = sp.streaming_prefill_hopper(q, k, v, HEAD_SINKS, HEAD_WINDOWS, 0.09, **variant)
        assert torch.isfinite(out).all()
        assert _rel(out, _expected_per_head(q, k, v, HEAD_SINKS, HEAD_WINDOWS, 0.09)) < 1e-2, (sq, sk)
        # one rule for every head is not what ran: the first head's rule on every head differs
        assert _rel(out, _expected_per_head(q, k, v, HEAD_SINKS[:1] * 8, HEAD_WINDOWS[:1] * 8, 0.09)) > 5e-2


@needs_hopper
def test_refuses_what_it_does_not_cover():
    from sparsecc.codegen.streaming_prefill_hopper import streaming_prefill_hopper

    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head dim 128"):
        streaming_prefill_hopper(q, q, q, 4, 16)


@needs_hopper
@pytest.mark.parametrize("variant", VARIANTS[1::2], ids=VARIANT_IDS[1::2])
def test_reads_transposed_inputs_in_place(variant):
    """[B, S, H, D] tensors transposed to [B, H, S, D] (what attention modules pass) give the oracle's output."""
    from sparsecc.codegen.streaming_prefill_hopper import streaming_prefill_hopper

    g = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(2, 600, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(2, 600, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(2, 600, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    out = streaming_prefill_hopper(q, k, v, 16, 200, 0.09, **variant)
    assert _rel(out, _expected(q, k, v, 16, 200, 0.09)) < 1e-2


@needs_hopper
@pytest.mark.parametrize("variant", VARIANTS[1::2], ids=VARIANT_IDS[1::2])
def test_rows_past_a_head_are_not_read(variant):
    """A ragged last key tile of head 0 must not read head 1's rows: a NaN in head 1's values leaves head 0 exact.
    In head 1 the NaN reaches the rows that keep key 3 and, through 0 x NaN in P V, every row of a program that
    reads its 128-key tile: a program holds 128 query rows and reads the key blocks of all of them, so rows
    128-255 read it (row 128's window starts at key 65); the programs of rows 256 on start past it."""
    from sparsecc.codegen.streaming_prefill_hopper import streaming_prefill_hopper

    g = torch.Generator(device="cuda").manual_seed(12)
    q, k, v = (torch.randn(1, 2, 400, 128, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    v[0, 1, 3] = float("nan")
    out = streaming_prefill_hopper(q, k, v, 0, 64, 0.09, **variant)
    assert _rel(out[:, :1], _expected(q[:, :1], k[:, :1], v[:, :1], 0, 64, 0.09)) < 1e-2
    assert torch.isfinite(out[0, 1, 256:]).all()    # programs whose key blocks start past key 3's tile
    clean = v[:, 1:].nan_to_num()                   # rows 256 on keep no key of that tile, so its values don't count
    assert _rel(out[:, 1:, 256:], _expected(q[:, 1:], k[:, 1:], clean, 0, 64, 0.09)[:, :, 256:]) < 1e-2
    assert torch.isnan(out[0, 1, 3]).all()          # and a row that keeps it carries the NaN (docs/spec.md)


# ---------------------------------------------------------------- CPU: argument checks, TMA strides

def _qkv(dtype=torch.bfloat16, kv_heads=2, d=128):
    return (torch.empty(1, 4, 64, d, dtype=dtype), torch.empty(1, kv_heads, 64, d, dtype=dtype),
            torch.empty(1, kv_heads, 64, d, dtype=dtype))


@pytest.mark.parametrize("change,match", [
    (dict(stages=1), "stages=1 is not allowed; expected an integer >= 2"),
    (dict(scale=-0.1), "scale=-0.1 is not allowed; expected a number > 0"),
    (dict(scale=0.0), "scale=0.0 is not allowed"),
    (dict(sink=-1), "sink=-1 is not allowed"),
    (dict(window=0), "window=0 is not allowed"),
    (dict(window=True), "window=True is not allowed"),
    (dict(sink=[4, 4, 4]), "sink has 3 entries; expected 1 or H = 4"),
    (dict(window=[16, 16, 0, 16]), "window=0 is not allowed"),
    (dict(qkv=_qkv(torch.float32)), "float16 or bfloat16"),
    (dict(qkv=_qkv(kv_heads=3)), "H % Hkv == 0"),
    (dict(qkv=_qkv(d=64)), "head dim 128"),
    (dict(persistent=True), "persistent=True is allowed only with warp_specialized=True"),
    (dict(), "runs on one CUDA device"),
])
def test_check_arguments_names_what_it_refuses(change, match):
    from sparsecc.codegen.streaming_prefill_hopper import check_arguments

    args = dict(sink=4, window=16, scale=0.09, stages=3)
    qkv = change.pop("qkv", _qkv())
    args.update(change)
    with pytest.raises(ValueError, match=match):
        check_arguments(*qkv, **args)


def test_value_shorter_than_key_is_refused():
    from sparsecc.codegen.streaming_prefill_hopper import check_arguments

    q, k, _ = _qkv()
    with pytest.raises(ValueError, match="k and v of one shape"):
        check_arguments(q, k, k[:, :, :10], 4, 16, 0.09, 3)


def test_tma_strides():
    """Size-1 dims get an aligned stride (PyTorch leaves theirs arbitrary and calls the tensor contiguous);
    transposed [B, S, H, D] inputs are read in place; expanded (stride 0) and misaligned ones are copied."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from sparsecc.codegen import streaming_prefill_hopper as sp

    base = torch.empty(8 * 64 * 128 + 64, dtype=torch.bfloat16)
    odd = base.as_strided((1, 8, 64, 128), (3, 64 * 128, 128, 1))
    assert odd.is_contiguous() and odd.contiguous() is odd
    assert sp._tma_strides(odd) == [8 * 64 * 128, 64 * 128, 128, 1]
    assert sp._tma_addressable(odd)
    sp._descriptors(odd, odd[:, :2], odd[:, :2], 128, 128)   # Triton's descriptor checks accept the strides
    assert sp._tma_addressable(torch.empty(2, 600, 4, 128, dtype=torch.bfloat16).transpose(1, 2))
    assert not sp._tma_addressable(torch.empty(1, 1, 64, 128, dtype=torch.bfloat16).expand(1, 4, 64, 128))
    assert not sp._tma_addressable(torch.empty(1, 4, 64, 130, dtype=torch.bfloat16)[..., :128])
