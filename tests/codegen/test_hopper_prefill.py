"""Which streaming calls run the Gluon program for sm_90 (codegen/hopper_prefill.py), and that they compute the
spec's streaming rule.

On CPU the dispatch is checked with the sm_90 test answered yes and a stand-in for the program (Gluon has no
interpreter): the rule, the arguments the wrapper passes (compared through the float64 oracle), and the one opaque
op a traced call becomes. On an sm_90 GPU (``gpu``) the program itself runs: through the kernel wrapper and inside
a compiled model, each first checking that the program ran, then against float64 attention over the spec's keep
mask (tests/oracle).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from sparsecc.codegen import hopper_prefill
from sparsecc.codegen.block_attention import streaming_attention
from tests.oracle import oracle


def _expected_keep(q, k, v, keep, scale):
    """The oracle's float64 attention over an explicit keep mask (``oracle.attend``, on the CPU; a row keeping no
    key gives zeros), on q's device."""
    out, _ = oracle.attend(q.cpu(), k.cpu(), v.cpu(), keep.cpu(), scale=scale)
    return out.to(q.device)


def _expected(q, k, v, sink, window, scale):
    """The spec's causal streaming keep mask through :func:`_expected_keep`."""
    return _expected_keep(q, k, v, oracle.streaming_keep(q.shape[2], k.shape[2], sink, window, causal=True), scale)


def _rel(out, ref) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _qkv(sq=256, sk=384, h=4, hkv=2, d=128, dtype=torch.float16, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(2, h, sq, d, dtype=dtype, device=device, generator=g),
            torch.randn(2, hkv, sk, d, dtype=dtype, device=device, generator=g),
            torch.randn(2, hkv, sk, d, dtype=dtype, device=device, generator=g))


# ---------------------------------------------------------------- CPU: the rule and the dispatch

FITS = dict(dtypes=(torch.bfloat16,) * 3, head_dims=(128, 128, 128), seq_q=256, seq_k=1024, causal=True,
            masked=False, return_lse=False, sinks=[64] * 4, windows=[512] * 4)


def _fits(**change):
    facts = {**FITS, **change}
    return hopper_prefill.hopper_prefill_fits(torch.device("cuda"), facts.pop("dtypes"), facts.pop("head_dims"),
                                              facts.pop("seq_q"), facts.pop("seq_k"), **facts)


@pytest.fixture
def sm90(monkeypatch):
    """Answer "an sm_90 GPU with Gluon" for every device."""
    monkeypatch.setattr(hopper_prefill, "sm90_gluon", lambda device: True)


def test_the_rule_takes_what_the_program_takes(sm90):
    assert _fits()
    assert _fits(dtypes=(torch.float16,) * 3, seq_q=128, seq_k=128)
    assert not _fits(causal=False)
    assert not _fits(masked=True)
    assert not _fits(return_lse=True)
    assert not _fits(dtypes=(torch.float32,) * 3)
    assert not _fits(dtypes=(torch.bfloat16, torch.float16, torch.bfloat16))
    assert not _fits(head_dims=(64, 64, 64))
    assert not _fits(head_dims=(128, 128, 64))
    assert _fits(sinks=[64, 64, 0, 0])                 # per-head rules: each tile reads its head's
    assert _fits(windows=[512, 512, 512, 256])
    assert _fits(windows=[512, 1025 + 256, 512, 256])  # a dense head among them (kernel form: past every distance)
    assert not _fits(seq_q=127)                         # shorter than one query tile (chunks, decode)
    assert not _fits(seq_q=2048)                        # more queries than keys


def test_a_symbolic_query_count_keeps_the_triton_kernel(sm90):
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    assert not _fits(seq_q=ShapeEnv().create_unbacked_symint())


def test_no_gpu_no_program(monkeypatch):
    assert not hopper_prefill.sm90_gluon(torch.device("cpu"))
    monkeypatch.setattr(hopper_prefill, "sm90_gluon", lambda device: False)   # another GPU, or Triton without Gluon
    assert not _fits()


def test_a_fitting_call_runs_the_program_with_the_spec_rule(sm90, monkeypatch):
    """The wrapper hands the program each head's sink and window (the kernels' capped rule) and the scale: run
    through the op's reference in place of the program, its output is the spec's streaming rule, head by head."""
    calls = []

    def stand_in(q, k, v, scale, sink, window):
        calls.append((sink, window, scale))
        return hopper_prefill_reference(q, k, v, scale, sink, window)

    monkeypatch.setattr(hopper_prefill, "streaming_prefill_sm90_kernel", stand_in)
    q, k, v = _qkv()
    for sink, window in ((16, 100), (0, 5000)):
        out = streaming_attention(q, k, v, sink=[sink], window=[window], scale=0.1, causal=True)
        assert _rel(out, _expected(q, k, v, sink, window, 0.1)) < 2e-3
    # a window past every distance is capped
    assert calls == [((16,) * 4, (100,) * 4, 0.1), ((0,) * 4, (384 + 256 + 1,) * 4, 0.1)]
    sinks, windows = [16, 0, 40, 16], [100, 300, 7, -1]   # -1: a dense head
    out = streaming_attention(q, k, v, sink=sinks, window=windows, scale=0.1, causal=True)
    keep = torch.stack([oracle.streaming_keep(256, 384, s_, w_ if w_ > 0 else 1 << 20, causal=True)
                        for s_, w_ in zip(sinks, windows)])[None]
    assert _rel(out, _expected_keep(q, k, v, keep.expand(2, -1, -1, -1), 0.1)) < 2e-3
    assert calls[-1] == ((16, 0, 40, 0), (100, 300, 7, 384 + 256 + 1), 0.1)


def hopper_prefill_reference(q, k, v, scale, sink, window):
    from sparsecc.codegen.attention_ops import STREAMING_PREFILL_SM90

    return STREAMING_PREFILL_SM90.reference(q, k, v, scale, sink, window)


def test_calls_the_program_does_not_take_skip_it(sm90, monkeypatch):
    """Through the wrapper, in half precision: a mask, a short chunk, an lse request, a bidirectional call never
    reach the program; the Triton prefill launch (a stand-in here) takes them. A layout SDPA serves and
    ``scale <= 0`` don't either (the wrapper's rule, asked for a CUDA device)."""
    from sparsecc.codegen import block_attention, streaming_rules

    monkeypatch.setattr(hopper_prefill, "streaming_prefill_sm90_kernel",
                        lambda *a: pytest.fail("the Gluon program was called"))
    launches = []
    monkeypatch.setattr(block_attention, "launch_prefill",
                        lambda q, *a, **kw: launches.append(1) or torch.zeros_like(q))
    q, k, v = _qkv()
    mask = torch.ones(256, 384, dtype=torch.bool)
    calls = [dict(sink=[16], window=[100], mask=mask), dict(sink=[16, 16, 0, 0], window=[100] * 4, mask=mask),
             dict(sink=[16], window=[100], causal=False), dict(sink=[16], window=[100], return_lse=True)]
    for kwargs in calls:
        streaming_attention(q, k, v, **{"scale": 0.1, "causal": True, **kwargs})
    streaming_attention(q[:, :, :100], k, v, sink=[16], window=[100], scale=0.1, causal=True)   # one short chunk
    assert launches == [1] * (len(calls) + 1)
    # A window covering the sequence is SDPA's on CUDA (the wrapper's own rule, asked for a CUDA device).
    facts = (torch.device("cuda"), (torch.float16,) * 3, (128,) * 3)
    rule = dict(scale=0.1, causal=True, masked=False, return_lse=False, sinks=[16], windows=[4096])
    assert not streaming_rules.streaming_runs_hopper_program(*facts, 256, 256, **rule)
    assert streaming_rules.streaming_runs_hopper_program(*facts, 256, 256, **{**rule, "windows": [100]})
    assert not streaming_rules.streaming_runs_hopper_program(*facts, 256, 256, **{**rule, "scale": 0.0})


def test_symbolic_lengths_keep_the_traced_kernels(sm90, monkeypatch):
    """Traced with symbolic lengths (a dense head's window is then a symbolic ``Sk + Sq + 1``), the rule answers no
    without hashing or guarding on the lengths, and the Triton launch is traced."""
    from sparsecc.codegen import block_attention
    from sparsecc.layouts import FULL_WINDOW

    monkeypatch.setattr(block_attention, "launch_prefill", lambda q, *a, **kw: torch.empty_like(q))
    q, k, v = _qkv()

    def attend(q, k, v):
        return streaming_attention(q, k, v, sink=[0, 0, 0, 0], window=[256, FULL_WINDOW, 256, FULL_WINDOW],
                                   scale=0.1, causal=True)

    gm = make_fx(attend, tracing_mode="symbolic")(q, k, v)
    assert not any("streaming_prefill_sm90" in str(n.target) for n in gm.graph.nodes)


def test_a_traced_call_is_one_opaque_op(sm90, monkeypatch):
    """While traced, a fitting call becomes ``torch.ops.sparsecc.streaming_prefill_sm90`` (the program takes
    descriptors made on the host); the graph, run, gives the spec's rule."""
    monkeypatch.setattr(hopper_prefill, "streaming_prefill_sm90_kernel",
                        lambda *a: pytest.fail("the program was launched while tracing"))
    from sparsecc.codegen.ops import register_ops

    register_ops()
    q, k, v = _qkv()

    def attend(q, k, v):
        return streaming_attention(q, k, v, sink=[16], window=[100], scale=0.1, causal=True)

    gm = make_fx(attend, tracing_mode="fake")(q, k, v)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "sparsecc.streaming_prefill_sm90.default" in targets, targets
    assert not any("triton_kernel_wrapper" in t for t in targets), targets
    assert _rel(gm(q, k, v), _expected(q, k, v, 16, 100, 0.1)) < 2e-3   # the op on CPU runs its reference


def test_the_op_on_cpu_is_the_reference():
    from sparsecc.codegen.ops import register_ops

    register_ops()
    q, k, v = (t.float() for t in _qkv(sq=200, sk=300, h=6, hkv=3))
    out = torch.ops.sparsecc.streaming_prefill_sm90(q, k, v, 0.09, [5], [64])
    assert _rel(out, _expected(q, k, v, 5, 64, 0.09)) < 1e-5
    sinks, windows = [5, 0, 40, 5, 5, 9], [64, 200, 3, 64, 64, 301]   # one rule per head; 301: every key
    out = torch.ops.sparsecc.streaming_prefill_sm90(q, k, v, 0.09, sinks, windows)
    keep = torch.stack([oracle.streaming_keep(200, 300, s_, w_, causal=True) for s_, w_ in zip(sinks, windows)])
    assert _rel(out, _expected_keep(q, k, v, keep[None].expand(2, -1, -1, -1), 0.09)) < 1e-5


# ---------------------------------------------------------------- sm_90: the program itself

def _hopper() -> bool:
    return torch.cuda.is_available() and hopper_prefill.sm90_gluon(torch.device("cuda"))


def needs_hopper(test):
    """A ``gpu`` test that runs on sm_90 only."""
    return pytest.mark.gpu(pytest.mark.skipif(not _hopper(), reason="the Gluon program targets sm_90")(test))


def _counting(monkeypatch) -> list:
    """Count the program's launches (the wrapper reads the kernel callable at each call)."""
    calls, real = [], hopper_prefill.streaming_prefill_sm90_kernel

    def counted(*args):
        calls.append(args[3:])
        return real(*args)

    monkeypatch.setattr(hopper_prefill, "streaming_prefill_sm90_kernel", counted)
    return calls


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_the_wrapper_runs_the_program(dtype, monkeypatch):
    calls = _counting(monkeypatch)
    q, k, v = _qkv(sq=640, sk=1000, h=8, hkv=2, dtype=dtype, device="cuda", seed=3)
    out = streaming_attention(q, k, v, sink=[64], window=[256], scale=0.09, causal=True)
    assert len(calls) == 1
    assert _rel(out, _expected(q, k, v, 64, 256, 0.09)) < 1e-2
    assert _rel(out, _expected(q, k, v, 0, 1000, 0.09)) > 5e-2   # the rule changes this output


@needs_hopper
def test_gpu_the_wrapper_runs_the_program_with_rules_per_head(monkeypatch):
    """Per-head rules (a dense head among streaming heads of two windows, different inside a kv group) run the
    program in one launch, and each head equals the float64 oracle of its own rule."""
    calls = _counting(monkeypatch)
    q, k, v = _qkv(sq=640, sk=1000, h=8, hkv=2, dtype=torch.bfloat16, device="cuda", seed=4)
    sinks, windows = [64, 0, 64, 16] * 2, [256, -1, 64, 512] * 2
    out = streaming_attention(q, k, v, sink=sinks, window=windows, scale=0.09, causal=True)
    assert len(calls) == 1
    keep = torch.stack([oracle.streaming_keep(640, 1000, s_, w_ if w_ > 0 else 1 << 20, causal=True)
                        for s_, w_ in zip(sinks, windows)])[None].expand(2, -1, -1, -1)
    assert _rel(out, _expected_keep(q, k, v, keep, 0.09)) < 1e-2


@needs_hopper
def test_gpu_a_compiled_site_runs_the_program(monkeypatch):
    """A compiled block whose streaming site fits: the report names the program, it runs, and the output is the
    block's float64 output with its attention restricted to the spec's keep mask."""
    import sparsecc
    from tests import zoo
    from tests.oracle.oracle import static_keep

    calls = _counting(monkeypatch)
    torch.manual_seed(0)
    model = zoo.Block(zoo.SdpaAttention, zoo.GatedSiluFFN, hidden=512, heads=4, kv_heads=2, inner=1024, bias=False)
    model = model.eval().cuda().to(torch.bfloat16)
    with torch.no_grad():
        model.attn.o_proj.weight.mul_(4.0)
    x = torch.randn(2, 1000, 512, device="cuda", dtype=torch.bfloat16)
    attn = {"form": "streaming", "sink": 16, "window": 128}
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [attn]}
    with torch.no_grad():
        out = sparsecc.compile(model, spec=spec, kernels="triton")(x)
        site = [s for s in sparsecc.last_report().sites if s.kind == "attention"][0]
        assert site.applied and "sm_90 prefill" in site.attrs["plan"], site.attrs
        assert calls, "the compiled site did not run the Gluon program"
        keep = static_keep(attn, 1000, 1000, causal=True).cuda()
        mid = x.double() + model.attn.expected(x, keep).double()
        expected = mid + copy.deepcopy(model.mlp).double()(mid)
    assert _rel(out.float(), expected) < 1e-2


def _block(dtype):
    from tests import zoo

    torch.manual_seed(0)
    block = zoo.Block(zoo.SdpaAttention, zoo.GatedSiluFFN, hidden=256, heads=2, kv_heads=1, inner=256, bias=False)
    return block.eval().to(dtype)


@pytest.mark.parametrize("answer", [True, False])
def test_the_report_names_the_program_where_the_rule_takes_the_site(answer, monkeypatch):
    """The plan shows the program on the sites whose calls the kernel wrapper will send to it (same rule), at
    static shapes (each explain starts from a fresh Dynamo, so the lengths stay static)."""
    import sparsecc

    monkeypatch.setattr(hopper_prefill, "sm90_gluon", lambda device: answer)
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [{"form": "streaming", "sink": 16,
                                                                          "window": 64}]}
    x = torch.randn(1, 256, 256, dtype=torch.float16)
    for rows, note in ((256, answer), (100, False)):      # 100: fewer rows than one query tile
        torch._dynamo.reset()
        report = sparsecc.explain(_block(torch.float16), x[:, :rows], spec=spec)
        site = [s for s in report.sites if s.kind == "attention"][0]
        assert site.applied and site.attrs["seq_q"] == rows and isinstance(site.attrs["seq_q"], int), site.attrs
        expected = "sm_90 prefill: the Gluon program (codegen/hopper_prefill.py), one opaque call"
        assert (expected in site.attrs["plan"]) == note, site.attrs["plan"]


def test_a_mixed_site_names_its_streaming_heads(sm90):
    """A mixed site whose table no one-launch family runs (vertical_slash and block_sparse heads together, or
    block_sparse blocks under 16) runs its heads group by group, the streaming group through the streaming op, so
    the plan names those heads; with block_sparse heads of 64-blocks beside them the one launch runs every head (no
    note). Streaming beside dense heads is one streaming op with per-head rules, which the program takes too."""
    import sparsecc
    from tests import zoo

    torch.manual_seed(0)
    block = zoo.Block(zoo.SdpaAttention, zoo.GatedSiluFFN, hidden=512, heads=4, kv_heads=2, inner=256, bias=False)
    block = block.eval().to(torch.float16)
    x = torch.randn(1, 256, 512, dtype=torch.float16)
    streaming = {"form": "streaming", "sink": 16, "window": 64, "heads": [0, 1], "policy": "force"}
    vertical_slash = {"form": "vertical_slash", "block": 64, "last_q": 16, "vertical": 2, "slash": 2, "heads": [2],
                      "policy": "force"}

    def block_sparse(size, heads):
        return {"form": "block_sparse", "block": size, "heads": heads, "policy": "force"}

    note = ("sm_90 prefill: the Gluon program (codegen/hopper_prefill.py) for heads 0-1, one launch per streaming "
            "group inside the mixed op")
    cases = [([streaming, vertical_slash, block_sparse(64, [3])], "mixed_head_attention", note),
             ([streaming, block_sparse(8, [2, 3])], "mixed_head_attention", note),
             ([streaming, {"form": "dense", "heads": [2]}, block_sparse(64, [3])], "mixed_head_attention", None),
             ([streaming, {"form": "dense", "heads": [2, 3]}], "streaming_attention",
              "sm_90 prefill: the Gluon program (codegen/hopper_prefill.py), one opaque call")]
    for rules, op, expected in cases:
        torch._dynamo.reset()
        report = sparsecc.explain(block, x, spec={"version": 1, "attention": rules})
        site = [s for s in report.sites if s.kind == "attention"][0]
        assert site.applied, site.reason
        plan = site.attrs["plan"]
        assert plan.startswith(op), plan
        assert (expected in plan) if expected else ("sm_90 prefill" not in plan), plan


def test_the_group_path_of_a_mixed_site_launches_the_program(sm90, monkeypatch):
    """What the plan note says runs: a mixed table with block_sparse blocks under 16 leaves the one launch, and its
    streaming group reaches the program (a stand-in: the op's reference) with one rule for the group's heads."""
    from sparsecc.codegen import attention_ops, block_attention, mixed_attention
    from sparsecc.forms import BlockSparse, Streaming

    calls = []

    def stand_in(q, k, v, scale, sink, window):
        calls.append((tuple(q.shape), sink, window))
        return hopper_prefill_reference(q, k, v, scale, sink, window)

    monkeypatch.setattr(hopper_prefill, "streaming_prefill_sm90_kernel", stand_in)
    kernels = {"mixed_head_attention": mixed_attention.mixed_head_attention_kernel,
               "streaming_attention": block_attention.streaming_attention_op}
    real = attention_ops.OpRecord.kernel_function
    monkeypatch.setattr(attention_ops.OpRecord, "kernel_function",
                        lambda self, device: kernels.get(self.name) or real(self, device))
    q, k, v = _qkv(sq=256, sk=256)
    for size, expected in ((8, [((2, 2, 256, 128), (16, 16), (64, 64))]), (64, [])):
        calls.clear()
        table = mixed_attention.HeadTable.of([Streaming(16, 64)] * 2 + [BlockSparse(size)] * 2)
        if size == 64:   # the block family's one launch would run the Triton kernel: stand in for it too
            monkeypatch.setattr(mixed_attention, "block_family", lambda q, *a: torch.zeros_like(q))
        attention_ops.mixed_head_attention(q, k, v, None, 0.1, True, *table.op_args(), 0, "auto")
        assert calls == expected


# ---------------------------------------------------------------- block tables

def _table(heads: int, seq: int, seed: int, empty=None):
    """A causal 128 x 128 BlockTable written here: per head, the diagonal block partial (causality applies) and
    each block below it kept as a full block with probability 0.3 (block 0 always). ``empty`` = (head, query block)
    keeps nothing. Returns (table, the [H, S, S] keep mask its documented semantics give)."""
    from sparsecc.layouts import BlockTable

    g = torch.Generator().manual_seed(seed)
    n = -(-seq // 128)
    below = torch.rand(heads, n, n, generator=g) < 0.3
    below[..., 0] = True
    below &= torch.ones(n, n, dtype=torch.bool).tril(-1)
    diag = torch.eye(n, dtype=torch.bool).expand(heads, n, n).clone()
    if empty is not None:
        below[empty], diag[empty] = False, False

    def lists(blocks):
        num = blocks.sum(-1).int()
        idx = torch.zeros(heads, n, n, dtype=torch.int32)
        for h in range(heads):
            for a in range(n):
                kept = blocks[h, a].nonzero().flatten()
                idx[h, a, :len(kept)] = kept.int()
        return num[None], idx[None]

    (num, idx), (fnum, fidx) = lists(diag), lists(below)
    table = BlockTable(num, idx, fnum, fidx, block_q=128, block_k=128, seq_q=seq, seq_k=seq, causal=True)
    pos = torch.arange(seq)
    block_of = pos // 128
    keep = below[:, block_of][:, :, block_of] | (diag[:, block_of][:, :, block_of] & (pos[None, :] <= pos[:, None]))
    return table, keep


def _batched_table(heads: int, seq: int, seeds):
    """One table batch per seed (``_table``'s layout, drawn per seed): (table, [keep mask of each batch])."""
    from sparsecc.layouts import BlockTable

    parts = [_table(heads=heads, seq=seq, seed=seed) for seed in seeds]
    tables = [t for t, _ in parts]
    cat = {name: torch.cat([getattr(t, name) for t in tables])
           for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")}
    table = BlockTable(cat["kv_num_blocks"], cat["kv_indices"], cat["full_kv_num_blocks"], cat["full_kv_indices"],
                       block_q=128, block_k=128, seq_q=seq, seq_k=seq, causal=True)
    return table, [keep for _, keep in parts]


def test_program_blocks_list_each_query_blocks_trips():
    """Row (b, h, a): the partial count, the trip count, then the partial blocks and the full blocks, in order."""
    from sparsecc.codegen.hopper_prefill import program_blocks

    table, _ = _table(heads=3, seq=700, seed=1, empty=(1, 2))
    # One row per table batch (here one, serving every batch element) and table head.
    rows = program_blocks(table, torch.device("cpu")).view(3, 6, -1)
    for h in range(3):
        for a in range(6):
            n_part, n_full = int(table.kv_num_blocks[0, h, a]), int(table.full_kv_num_blocks[0, h, a])
            row = rows[h, a].tolist()
            assert row[:2] == [n_part, n_part + n_full]
            assert row[2:2 + n_part + n_full] == (table.kv_indices[0, h, a, :n_part].tolist()
                                                  + table.full_kv_indices[0, h, a, :n_full].tolist())
    assert rows[1, 2, :2].tolist() == [0, 0]
    assert program_blocks(table, torch.device("cpu")) is program_blocks(table, torch.device("cpu"))   # cached


def test_program_blocks_of_a_table_per_batch_element():
    """A table with one batch per batch element: its rows run over (table batch, table head, query block), batch 1's
    rows listing batch 1's blocks."""
    from sparsecc.codegen.hopper_prefill import program_blocks

    table, _ = _batched_table(heads=3, seq=700, seeds=(2, 3))
    rows = program_blocks(table, torch.device("cpu")).view(2, 3, 6, -1)
    for b in range(2):
        for h in range(3):
            for a in range(6):
                n_part, n_full = int(table.kv_num_blocks[b, h, a]), int(table.full_kv_num_blocks[b, h, a])
                assert rows[b, h, a, :2].tolist() == [n_part, n_part + n_full]
                assert rows[b, h, a, 2:2 + n_part + n_full].tolist() == (
                    table.kv_indices[b, h, a, :n_part].tolist() + table.full_kv_indices[b, h, a, :n_full].tolist())
    assert not torch.equal(rows[0], rows[1])   # the two batches' layouts differ


def test_table_calls_reach_the_program_only_when_it_takes_them(sm90, monkeypatch):
    """A causal 128 x 128 table over Sq == Sk without a mask goes to the program (here a stand-in: the float64
    expectation from the table's semantics); a mask or another block size keeps the kernel path (the reference
    answers on CPU for float32)."""
    from sparsecc.codegen.block_attention import block_sparse_attention

    calls = []

    def stand_in(q, k, v, table, scale):
        calls.append(scale)
        return _expected_keep(q, k, v, keep, scale).to(q.dtype)

    monkeypatch.setattr(hopper_prefill, "hopper_table_prefill", stand_in)
    monkeypatch.setattr("sparsecc.codegen.block_attention.hopper_table_prefill", stand_in)
    table, keep = _table(heads=4, seq=384, seed=2)
    q, k, v = _qkv(sq=384, sk=384)
    block_sparse_attention(q, k, v, table=table, scale=0.1)
    assert calls == [0.1]
    q32, k32, v32 = (t.float() for t in (q, k, v))
    out = block_sparse_attention(q32, k32, v32, table=table, scale=0.1)    # float32: not the program
    assert calls == [0.1]
    assert _rel(out, _expected_keep(q32, k32, v32, keep, 0.1)) < 1e-5
    assert not hopper_prefill.hopper_table_fits(q, k, v, table, masked=True, return_lse=False)
    assert not hopper_prefill.hopper_table_fits(q, k, v, table, masked=False, return_lse=True)
    assert not hopper_prefill.hopper_table_fits(q[:, :, :256], k, v, table, masked=False, return_lse=False)


def test_the_table_rule_takes_what_the_program_takes(sm90):
    """The facts-only table rule, which the compiler asks with a site's facts (its cost estimate then times the
    program): a causal table of 128-blocks over Sq == Sk, static, at least one query tile, no mask or lse."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    facts = dict(dtypes=(torch.bfloat16,) * 3, head_dims=(128,) * 3, seq_q=1024, seq_k=1024, block=128, causal=True,
                 masked=False, return_lse=False)

    def runs(**change):
        f = {**facts, **change}
        return hopper_prefill.hopper_table_runs(torch.device("cuda"), f.pop("dtypes"), f.pop("head_dims"),
                                                f.pop("seq_q"), f.pop("seq_k"), **f)

    assert runs() and runs(seq_q=128, seq_k=128, dtypes=(torch.float16,) * 3)
    for change in (dict(block=64), dict(causal=False), dict(masked=True), dict(return_lse=True), dict(seq_q=512),
                   dict(seq_q=127, seq_k=127), dict(dtypes=(torch.float32,) * 3), dict(head_dims=(64,) * 3),
                   dict(seq_q=ShapeEnv().create_unbacked_symint())):
        assert not runs(**change), change


@needs_hopper
@pytest.mark.parametrize("variant", [dict(stages=3), dict(stages=3, warp_specialized=True),
                                     dict(stages=2, warp_specialized=True, pingpong=True),
                                     dict(stages=3, warp_specialized=True, persistent=True),
                                     dict(stages=3, warp_specialized=True, pingpong=True, persistent=True)],
                         ids=["s3", "ws3", "pp2", "ws3p", "pp3p"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_table_program_keeps_what_the_table_says(variant, dtype, monkeypatch):
    """Every program over a table written here (a ragged last block, GQA, a query block that keeps nothing, whose
    rows are zeros) against float64 attention over the table's keep mask. The persistent programs run on 5
    programs (the SM count patched down), so one program meets tiles of every trip count, the empty one too."""
    from sparsecc.codegen import streaming_prefill_hopper as sp
    from sparsecc.codegen.streaming_prefill_hopper import block_table_prefill_hopper

    monkeypatch.setattr(sp, "sm_count", lambda device: 5)

    table, keep = _table(heads=8, seq=1000, seed=5, empty=(3, 4))
    q, k, v = _qkv(sq=1000, sk=1000, h=8, hkv=2, dtype=dtype, device="cuda", seed=5)
    out = block_table_prefill_hopper(q, k, v, table, 0.09, **variant)
    expected = _expected_keep(q, k, v, keep, 0.09)
    assert _rel(out, expected) < 1e-2
    assert (out[:, 3, 512:640] == 0).all()
    assert _rel(out, _expected_keep(q, k, v, oracle.causal_keep(1000, 1000), 0.09)) > 5e-2   # not dense


@needs_hopper
def test_gpu_table_per_batch_element(monkeypatch):
    """A table with its own layout per batch element, through the dispatched program on 5 programs: each batch
    element's output is float64 attention over its own keep mask, not the other's."""
    from sparsecc.codegen import streaming_prefill_hopper as sp

    monkeypatch.setattr(sp, "sm_count", lambda device: 5)
    table, keeps = _batched_table(heads=4, seq=640, seeds=(7, 8))
    q, k, v = _qkv(sq=640, sk=640, h=4, hkv=2, dtype=torch.bfloat16, device="cuda", seed=7)
    out = sp.block_table_prefill_hopper(q, k, v, table, 0.09, **hopper_prefill.VARIANT)
    for b in range(2):
        one = (q[b:b + 1], k[b:b + 1], v[b:b + 1])
        assert _rel(out[b:b + 1], _expected_keep(*one, keeps[b], 0.09)) < 1e-2
        assert _rel(out[b:b + 1], _expected_keep(*one, keeps[1 - b], 0.09)) > 5e-2


@needs_hopper
def test_gpu_block_sparse_attention_runs_the_table_program(monkeypatch):
    from sparsecc.codegen.block_attention import block_sparse_attention

    calls, real = [], hopper_prefill.hopper_table_prefill

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr("sparsecc.codegen.block_attention.hopper_table_prefill", counted)
    table, keep = _table(heads=1, seq=768, seed=6)    # one table head serves every head
    q, k, v = _qkv(sq=768, sk=768, h=4, hkv=4, dtype=torch.bfloat16, device="cuda", seed=6)
    out = block_sparse_attention(q, k, v, table=table, scale=0.09)
    assert calls == [1]
    assert _rel(out, _expected_keep(q, k, v, keep, 0.09)) < 1e-2
