"""Streaming (sink + window) causal prefill attention for Hopper, written in Gluon.

A second kernel for the streaming layout of ``codegen/block_attention_kernels.py`` on sm_90, with the
pipeline spelled out instead of left to Triton's scheduler: K and V tiles arrive by TMA into a ring of
shared-memory stages (one mbarrier per tile), ``S_t = Q K_tᵀ`` and ``O += P_{t-1} V_{t-1}`` are issued
back to back as asynchronous warpgroup MMAs, and the softmax of ``S_t`` runs while ``P_{t-1} V_{t-1}``
is still on the tensor cores (P is passed to the MMA from registers, in the accumulator's own layout).
Three programs (docs/kernels.md): software-pipelined (one CTA-wide barrier per trip), warp-specialised
(a producer warp, two consumer warpgroups that never wait for each other) and ping-pong (the consumers
take turns at issuing MMAs); the last two also run persistent (a program per SM, several query tiles each).
``codegen/hopper_prefill.py`` says which calls run which program (``VARIANT``: persistent ping-pong);
bench/prefill_hopper.py times them against the Triton kernel (bench/RESULTS.md).

Imported lazily (Gluon is Triton's experimental layer; nothing here runs at import of sparsecc). There
is no interpreter path for Gluon, so the CPU checks of the streaming layout run the Triton kernel; these
programs are checked on the GPU against the float64 oracle (tests/codegen/test_streaming_prefill_hopper.py)
and compiled for sm_90 on CPU (tests/codegen/test_gluon_compile.py).

Semantics (docs/spec.md, streaming, causal): query row ``i`` sits at position ``p = i + Sk - Sq`` and
attends key ``j`` iff ``j <= p`` and (``j < sink`` or ``p - j < window``). Inputs:
``[B, H, Sq, D]`` queries, ``[B, Hkv, Sk, D]`` keys and values (GQA when ``Hkv < H``; any strides TMA can
address, read through 4-D descriptors one (batch, head) tile at a time), float16 or bfloat16, ``D = 128``;
one sink and window for every head, or one per head (``PER_HEAD``: each query tile reads its head's from two int32
vectors, and its key blocks follow that rule).
"""

from __future__ import annotations

from typing import Optional

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from sparsecc.codegen.hopper_prefill import TILE, check_arguments, check_table, program_blocks
from sparsecc.codegen.launch import sm_count
from sparsecc.codegen.streaming_rules import kernel_rules, per_head_rules, per_head_values, rule_vectors
from sparsecc.codegen.block_attention_kernels import LOG2E

# The TMA load builtin: ``async_load`` in newer Gluon, ``async_copy_global_to_shared`` in triton 3.6 (the newer
# releases keep the old name only to raise).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# The CTA-wide barrier: ``thread_barrier`` in triton 3.6, ``barrier`` in newer Gluon.
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

__all__ = ["streaming_prefill_hopper", "block_table_prefill_hopper", "check_arguments", "check_table"]


@gluon.jit
def _trip_block(t, n_trips, n_sink, window_first, blocks, TABLE: gl.constexpr):
    """Key block of trip ``t``. Streaming: the sink blocks first, then the window's blocks in order. A block
    table: entry ``t`` of the program's list (``blocks``: its partial blocks, then its full ones)."""
    if TABLE:
        return gl.load(blocks + t, mask=t < n_trips, other=0)
    else:
        return gl.where(t < n_sink, t, window_first + t - n_sink)


@gluon.jit
def _load_kv(desc, bars, ring, t, n_trips, n_sink, window_first, blocks, b, hk,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, TABLE: gl.constexpr):
    """Start the TMA load of trip ``t``'s K (or V) tile into its stage; nothing past the last trip."""
    stage = t % STAGES
    live = t < n_trips
    row = _trip_block(t, n_trips, n_sink, window_first, blocks, TABLE) * BLOCK_N
    mbarrier.expect(bars.index(stage), desc.block_type.nbytes, pred=live)
    _tma_load(desc, [b, hk, row, 0], bars.index(stage), ring.index(stage), pred=live)


@gluon.jit
def _tile_coords(tile, seq_q, H: gl.constexpr, BLOCK_M: gl.constexpr):
    """(b, h, m0) of query tile ``tile``: tiles run over (batch, head) and, within one, heaviest (latest) query
    block first."""
    n_m = gl.cdiv(seq_q, BLOCK_M)
    bh = tile // n_m
    return bh // H, bh % H, (n_m - 1 - tile % n_m) * BLOCK_M


@gluon.jit
def _program_tile(tile, seq_q, seq_k, sink, window, rule_sinks, rule_windows, H: gl.constexpr,
                  GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PER_HEAD: gl.constexpr):
    """Query tile ``tile``, its rule and its key blocks: (b, h, m0, n_sink, wb, n_trips, sink, window).

    The rule is ``sink`` / ``window``, or with ``PER_HEAD`` the tile's head's entries of ``rule_sinks`` /
    ``rule_windows``. The key blocks are the sink blocks, then the window's blocks ``[wb, we)`` (the Triton
    kernel's arithmetic); trip ``t`` visits ``_trip_block(t, n_sink, wb)``."""
    b, h, m0 = _tile_coords(tile, seq_q, H, BLOCK_M)
    if PER_HEAD:
        sink = gl.load(rule_sinks + h)
        window = gl.load(rule_windows + h)
    offset = seq_k - seq_q
    p0 = m0 + offset
    p1 = gl.minimum(m0 + BLOCK_M, seq_q) - 1 + offset
    hi = gl.maximum(gl.minimum(p1 + 1, seq_k), 0)
    lo = gl.maximum(p0 - window + 1, 0)
    n_sink = gl.cdiv(gl.maximum(gl.minimum(sink, hi), 0), BLOCK_N)
    wb = gl.maximum(lo // BLOCK_N, n_sink)
    we = gl.maximum(gl.cdiv(hi, BLOCK_N), wb)
    return b, h, m0, n_sink, wb, n_sink + (we - wb), sink, window


@gluon.jit
def _table_tile(tile, table, seq_q, width, table_batches, table_heads, H: gl.constexpr, BLOCK_M: gl.constexpr):
    """Query tile ``tile`` of a block table and its key blocks: (b, h, m0, n_partial, blocks, n_trips).

    ``table`` rows are ``[n_partial, n_trips, block_0, ..., block_{width-3}]`` per (table batch, table head, query
    block), a table batch or head count of 1 serving every batch element or head; query blocks run heaviest
    (latest) first, as in ``_program_tile``."""
    b, h, m0 = _tile_coords(tile, seq_q, H, BLOCK_M)
    table_row = (b % table_batches) * table_heads + h % table_heads
    row = table + (table_row.to(gl.int64) * gl.cdiv(seq_q, BLOCK_M) + m0 // BLOCK_M) * width
    return b, h, m0, gl.load(row), row + 2, gl.load(row + 1)


@gluon.jit
def _store_rows(out_ptr, acc, l_i, bh, offs_m, seq_q, HEAD_DIM: gl.constexpr, col_layout: gl.constexpr):
    """O = acc / l in the input dtype, rows past the sequence not stored (a row with no kept key gives 0)."""
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty)
    offs_d = gl.arange(0, HEAD_DIM, layout=col_layout)
    rows = bh.to(gl.int64) * seq_q + offs_m
    gl.store(out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], out, mask=(offs_m < seq_q)[:, None])


@gluon.jit
def _online_softmax(s, m_i, l_i, t, n0, pos, offs_n, p0, p1, seq_k, sink, window, qk_scale, BLOCK_N: gl.constexpr,
                    TABLE: gl.constexpr):
    """One key block of the online softmax: masks the block where some element falls outside the rule, and
    returns (P in float32, the rescale factor of the previous rows' sums, the new max, the new sum).

    Streaming: the rule is the sink and window. A block table (causal): trips before ``sink`` (the program's
    partial blocks) apply causality and the sequence end, the full blocks nothing."""
    if TABLE:
        full = t >= sink
    else:
        full = (n0 + BLOCK_N <= seq_k) & (n0 + BLOCK_N - 1 <= p0) & ((n0 + BLOCK_N <= sink) | (n0 > p1 - window))
    if not full:
        keys = n0 + offs_n
        if TABLE:
            keep = (keys[None, :] <= pos[:, None]) & (keys[None, :] < seq_k)
        else:
            keep = (keys[None, :] <= pos[:, None]) & (keys[None, :] < seq_k) & \
                ((keys[None, :] < sink) | (pos[:, None] - keys[None, :] < window))
        s = gl.where(keep, s, float("-inf"))
    # The max is taken on the raw scores and scaled once per row, so each score costs one FMA before exp2.
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)   # a row with no kept key so far
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _attend_rows(q_desc, q_smem, q_bar, k_ring, v_ring, k_ready, v_ready, kv_empty, k_desc, v_desc, my_turn,
                 other_turn, out_ptr, bh, b, hk, r0, seq_q, seq_k, sink, window, qk_scale, n_trips, n_sink,
                 window_first, blocks, ring0, q_phase, round0, next_live, next_b, next_h, next_r0,
                 ROWS: gl.constexpr, WARPS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, REFILL: gl.constexpr, PINGPONG: gl.constexpr, LEADER: gl.constexpr,
                 TABLE: gl.constexpr):
    """ROWS query rows from ``r0`` (their Q tile on its way into ``q_smem``, landing as phase ``q_phase`` of
    ``q_bar``) over every trip of the tile's key blocks, then their output rows stored.

    A persistent program runs several tiles through one K/V ring: the tile's trip ``t`` is use ``ring0 + t`` of
    the ring and ping-pong round ``round0 + t``. Once the tile's last ``S`` is done, Q is read by no MMA, so the
    next tile's rows (``next_live``: ``[next_b, next_h, next_r0]``) are loaded into ``q_smem`` while this tile's
    last ``P V`` and output store run.

    Each trip issues ``S_t = Q K_tᵀ`` and the previous trip's ``P V`` back to back and runs the softmax of
    ``S_t`` while ``P V`` executes. Once a stage's ``P V`` is done the stage is handed back: with ``REFILL``
    (the software-pipelined program, every warp of the CTA here) after a CTA-wide barrier, by loading the
    trip ``STAGES`` ahead into it; otherwise (a consumer warpgroup of the warp-specialised program) by one
    arrival on ``kv_empty``, which the producer waits for. With ``PINGPONG`` each round of MMA issues waits for
    the other consumer's previous round (``_take_turn``)."""
    dtype: gl.constexpr = q_smem.dtype
    # The TMA tiles are [1, 1, rows, D] (one (batch, head) of a 4-D descriptor); the MMAs read them as [rows, D].
    q_tile = q_smem.reshape([ROWS, HEAD_DIM])
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
    col_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
    offset = seq_k - seq_q
    p0 = r0 + offset
    p1 = gl.minimum(r0 + ROWS, seq_q) - 1 + offset
    offs_m = r0 + gl.arange(0, ROWS, layout=row_layout)
    pos = offs_m + offset
    offs_n = gl.arange(0, BLOCK_N, layout=col_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.full([ROWS], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=mma_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=mma_layout)
    p = gl.zeros([ROWS, BLOCK_N], dtype, layout=p_layout)
    mbarrier.wait(q_bar, q_phase)

    # Trip 0 on its own: its S has no P V to overlap with.
    if n_trips > 0:
        stage0 = ring0 % STAGES
        phase0 = (ring0 // STAGES) & 1
        k_tile = k_ring.index(stage0).reshape([BLOCK_N, HEAD_DIM])
        mbarrier.wait(k_ready.index(stage0), phase0)
        _take_turn(my_turn, round0, PINGPONG, LEADER)
        s_tok = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        _pass_turn(other_turn, PINGPONG)
        s, _, _ = warpgroup_mma_wait(0, deps=(s_tok, q_tile, k_tile))
        n0 = _trip_block(0, n_trips, n_sink, window_first, blocks, TABLE) * BLOCK_N
        p_f32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, 0, n0, pos, offs_n, p0, p1, seq_k, sink, window,
                                                 qk_scale, BLOCK_N, TABLE)
        p = gl.convert_layout(p_f32.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(stage0), phase0)
    for t in range(1, n_trips):
        use = ring0 + t
        stage = use % STAGES
        phase = (use // STAGES) & 1
        prev = (use - 1) % STAGES
        k_tile = k_ring.index(stage).reshape([BLOCK_N, HEAD_DIM])
        v_prev = v_ring.index(prev).reshape([BLOCK_N, HEAD_DIM])
        mbarrier.wait(k_ready.index(stage), phase)
        _take_turn(my_turn, round0 + t, PINGPONG, LEADER)
        s_tok = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        # The previous trip's P V, on the tensor cores while this trip's softmax runs.
        acc = warpgroup_mma(p, v_prev, acc, is_async=True)
        _pass_turn(other_turn, PINGPONG)
        s, _, _ = warpgroup_mma_wait(1, deps=(s_tok, q_tile, k_tile))
        n0 = _trip_block(t, n_trips, n_sink, window_first, blocks, TABLE) * BLOCK_N
        p_f32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, t, n0, pos, offs_n, p0, p1, seq_k, sink, window,
                                                 qk_scale, BLOCK_N, TABLE)
        # P is the MMA's register operand: listed so it stays live until the MMA is done.
        acc, _, _ = warpgroup_mma_wait(0, deps=(acc, v_prev, p))
        if REFILL:   # every warpgroup is past the previous trip's P V: its stage takes the trip STAGES ahead
            _cta_barrier()
            _load_kv(k_desc, k_ready, k_ring, t - 1 + STAGES, n_trips, n_sink, window_first, blocks, b, hk, BLOCK_N,
                     STAGES, TABLE)
            _load_kv(v_desc, v_ready, v_ring, t - 1 + STAGES, n_trips, n_sink, window_first, blocks, b, hk, BLOCK_N,
                     STAGES, TABLE)
        else:
            mbarrier.arrive(kv_empty.index(prev), count=1)
        acc = acc * alpha[:, None]
        p = gl.convert_layout(p_f32.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(stage), phase)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes, pred=next_live)
    _tma_load(q_desc, [next_b, next_h, next_r0, 0], q_bar, q_smem, pred=next_live)
    if n_trips > 0:
        last = (ring0 + n_trips - 1) % STAGES
        v_last = v_ring.index(last).reshape([BLOCK_N, HEAD_DIM])
        _take_turn(my_turn, round0 + n_trips, PINGPONG, LEADER)
        acc = warpgroup_mma(p, v_last, acc, is_async=True)
        _pass_turn(other_turn, PINGPONG)
        acc, _, _ = warpgroup_mma_wait(0, deps=(acc, v_last, p))
        if not REFILL:   # the ring runs on into the next tile: the last stage goes back too
            mbarrier.arrive(kv_empty.index(last), count=1)
    _store_rows(out_ptr, acc, l_i, bh, offs_m, seq_q, HEAD_DIM, col_layout)


@gluon.jit
def _tile(tile, table, width, table_batches, table_heads, seq_q, seq_k, sink, window, rule_sinks, rule_windows,
          H: gl.constexpr, GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, TABLE: gl.constexpr,
          PER_HEAD: gl.constexpr):
    """(b, h, m0, n_sink, window_first, blocks, n_trips, sink, window) of query tile ``tile``, for either layout. A
    block table's programs carry their count of partial blocks where the streaming ones carry the sink (the
    softmax masks the trips before it); a streaming tile carries its head's rule."""
    if TABLE:
        b, h, m0, n_part, blocks, n_trips = _table_tile(tile, table, seq_q, width, table_batches, table_heads, H,
                                                        BLOCK_M)
        return b, h, m0, n_part, 0, blocks, n_trips, n_part, window
    else:
        b, h, m0, n_sink, wb, n_trips, sink, window = _program_tile(tile, seq_q, seq_k, sink, window, rule_sinks,
                                                                    rule_windows, H, GROUP, BLOCK_M, BLOCK_N,
                                                                    PER_HEAD)
        return b, h, m0, n_sink, wb, table, n_trips, sink, window


@gluon.jit
def _streaming_prefill_kernel(q_desc, k_desc, v_desc, out_ptr, table, width, table_batches, table_heads, seq_q,
                              seq_k, sink, window, rule_sinks, rule_windows, qk_scale, H: gl.constexpr,
                              GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, TABLE: gl.constexpr,
                              PER_HEAD: gl.constexpr, num_warps: gl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head), over the kept key blocks of the streaming rule or,
    with ``TABLE``, of the block table's row (``table``; unused by the streaming layout)."""
    gl.static_assert(BLOCK_N == HEAD_DIM, "S and O share one accumulator layout only when BLOCK_N == HEAD_DIM")
    gl.static_assert(STAGES >= 2, "a trip's stage is freed by the previous trip's P V: one stage waits for itself")
    dtype: gl.constexpr = q_desc.dtype
    b, h, m0, n_sink, wb, blocks, n_trips, sink, window = _tile(gl.program_id(0), table, width, table_batches,
                                                                 table_heads, seq_q, seq_k, sink, window, rule_sinks,
                                                                 rule_windows, H, GROUP, BLOCK_M, BLOCK_N, TABLE,
                                                                 PER_HEAD)
    hk = h // GROUP
    q_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [b, h, m0, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _load_kv(k_desc, k_bars, k_ring, i, n_trips, n_sink, wb, blocks, b, hk, BLOCK_N, STAGES, TABLE)
        _load_kv(v_desc, v_bars, v_ring, i, n_trips, n_sink, wb, blocks, b, hk, BLOCK_N, STAGES, TABLE)
    # kv_empty and the turn barriers are not read without warp specialisation (REFILL, no PINGPONG); one tile per
    # program, so no next tile's Q.
    _attend_rows(q_desc, q_smem, q_bar, k_ring, v_ring, k_bars, v_bars, k_bars, k_desc, v_desc, q_bar, q_bar,
                 out_ptr, b * H + h, b, hk, m0, seq_q, seq_k, sink, window, qk_scale, n_trips, n_sink, wb, blocks,
                 0, 0, 0, False, b, h, m0, BLOCK_M, num_warps, HEAD_DIM, BLOCK_N, STAGES, True, False, 0, TABLE)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

# ------------------------------------------------------------------ warp-specialised variant
# Two consumer warpgroups, each with its own 64 query rows, and one producer warp issuing the TMA loads. The
# consumers share the K/V ring but never wait for each other: each releases a stage (one arrival on its
# ``kv_empty`` barrier, count 2) once its P V on that stage is done, and the producer refills a stage after
# both arrivals. Free of a CTA-wide barrier per trip, one warpgroup's softmax can run while the other's
# MMAs hold the tensor cores.


@gluon.jit
def _ws_producer(k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, kv_empty, n_tiles, table, width, table_batches,
                 table_heads, seq_q, seq_k, sink, window, rule_sinks, rule_windows, H: gl.constexpr,
                 GROUP: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 TABLE: gl.constexpr, PER_HEAD: gl.constexpr):
    """Every trip of the program's tiles, in order, through one ring: use ``u`` of the ring goes to stage
    ``u % STAGES`` once both consumers have released use ``u - STAGES``."""
    use = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        b, h, m0, n_sink, wb, blocks, n_trips, _, _ = _tile(tile, table, width, table_batches, table_heads, seq_q,
                                                            seq_k, sink, window, rule_sinks, rule_windows, H, GROUP,
                                                            BLOCK_M, BLOCK_N, TABLE, PER_HEAD)
        hk = h // GROUP
        for t in range(0, n_trips):
            stage = use % STAGES
            mbarrier.wait(kv_empty.index(stage), ((use // STAGES) - 1) & 1, pred=use >= STAGES)
            row = _trip_block(t, n_trips, n_sink, wb, blocks, TABLE) * BLOCK_N
            mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
            _tma_load(k_desc, [b, hk, row, 0], k_ready.index(stage), k_ring.index(stage))
            mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
            _tma_load(v_desc, [b, hk, row, 0], v_ready.index(stage), v_ring.index(stage))
            use += 1


@gluon.jit
def _take_turn(my_turn, turn_round, PINGPONG: gl.constexpr, LEADER: gl.constexpr):
    """Ping-pong: wait until the other consumer has issued its MMAs of the previous round (the leader's first
    round waits for nobody)."""
    if PINGPONG:
        mbarrier.wait(my_turn, (turn_round - LEADER) & 1, pred=turn_round >= LEADER)


@gluon.jit
def _pass_turn(other_turn, PINGPONG: gl.constexpr):
    """Ping-pong: hand the turn to the other consumer once this round's MMAs are issued."""
    if PINGPONG:
        mbarrier.arrive(other_turn, count=1)


@gluon.jit
def _ws_consumer(q_desc, q_smem, q_bar, k_ring, v_ring, k_ready, v_ready, kv_empty, k_desc, v_desc, my_turn,
                 other_turn, out_ptr, n_tiles, table, width, table_batches, table_heads, seq_q, seq_k, sink, window,
                 rule_sinks, rule_windows, qk_scale, H: gl.constexpr, GROUP: gl.constexpr, ROW0: gl.constexpr,
                 HALF_M: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, PINGPONG: gl.constexpr, LEADER: gl.constexpr, TABLE: gl.constexpr,
                 PER_HEAD: gl.constexpr):
    """One consumer warpgroup: its HALF_M rows (ROW0 into each tile) of every tile of the program, in the
    producer's order; each tile's Q is loaded while the previous tile finishes."""
    first = gl.program_id(0)
    step = gl.num_programs(0)
    b, h, m0 = _tile_coords(first, seq_q, H, BLOCK_M)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [b, h, m0 + ROW0, 0], q_bar, q_smem)
    use = 0
    turn_round = 0
    q_phase = 0
    for tile in range(first, n_tiles, step):
        b, h, m0, n_sink, wb, blocks, n_trips, rule_sink, rule_window = _tile(
            tile, table, width, table_batches, table_heads, seq_q, seq_k, sink, window, rule_sinks, rule_windows, H,
            GROUP, BLOCK_M, BLOCK_N, TABLE, PER_HEAD)
        nb, nh, nm0 = _tile_coords(tile + step, seq_q, H, BLOCK_M)
        _attend_rows(q_desc, q_smem, q_bar, k_ring, v_ring, k_ready, v_ready, kv_empty, k_desc, v_desc, my_turn,
                     other_turn, out_ptr, b * H + h, b, h // GROUP, m0 + ROW0, seq_q, seq_k, rule_sink, rule_window,
                     qk_scale, n_trips, n_sink, wb, blocks, use, q_phase, turn_round, tile + step < n_tiles, nb, nh,
                     nm0 + ROW0, HALF_M, 4, HEAD_DIM, BLOCK_N, STAGES, False, PINGPONG, LEADER, TABLE)
        use += n_trips
        turn_round += gl.where(n_trips > 0, n_trips + 1, 0)
        q_phase ^= 1


@gluon.jit
def _streaming_prefill_ws_kernel(q_desc, k_desc, v_desc, out_ptr, table, width, table_batches, table_heads, seq_q,
                                 seq_k, sink, window, rule_sinks, rule_windows, qk_scale, n_tiles, H: gl.constexpr,
                                 GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                                 CONSUMER_REGS: gl.constexpr, PINGPONG: gl.constexpr, TABLE: gl.constexpr,
                                 PER_HEAD: gl.constexpr):
    """The warp-specialised program: same tiles, key ranges and semantics as ``_streaming_prefill_kernel``. A
    program runs tiles ``program_id, program_id + num_programs, ...`` below ``n_tiles``: one tile each when the
    grid has a program per tile, several when it is persistent (a program per SM), its K/V ring and the next
    tile's Q loads then running on across tile ends."""
    gl.static_assert(BLOCK_N == HEAD_DIM, "S and O share one accumulator layout only when BLOCK_N == HEAD_DIM")
    gl.static_assert(STAGES >= 2, "a trip's stage is freed by the previous trip's P V: one stage waits for itself")
    HALF_M: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = q_desc.dtype

    q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF_M, HEAD_DIM], q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(turns.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)
    fence_async_shared()
    gl.warp_specialize([
        (_ws_consumer, (q_desc, q_smem.index(0), q_bars.index(0), k_ring, v_ring, k_ready, v_ready, kv_empty, k_desc,
                        v_desc, turns.index(0), turns.index(1), out_ptr, n_tiles, table, width, table_batches,
                        table_heads, seq_q, seq_k, sink, window, rule_sinks, rule_windows, qk_scale, H, GROUP, 0,
                        HALF_M, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, PINGPONG, 1, TABLE, PER_HEAD)),
        (_ws_consumer, (q_desc, q_smem.index(1), q_bars.index(1), k_ring, v_ring, k_ready, v_ready, kv_empty, k_desc,
                        v_desc, turns.index(1), turns.index(0), out_ptr, n_tiles, table, width, table_batches,
                        table_heads, seq_q, seq_k, sink, window, rule_sinks, rule_windows, qk_scale, H, GROUP,
                        HALF_M, HALF_M, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, PINGPONG, 0, TABLE, PER_HEAD)),
        (_ws_producer, (k_desc, v_desc, k_ring, v_ring, k_ready, v_ready, kv_empty, n_tiles, table, width,
                        table_batches, table_heads, seq_q, seq_k, sink, window, rule_sinks, rule_windows, H, GROUP,
                        BLOCK_M, BLOCK_N, STAGES, TABLE, PER_HEAD)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# The program's query tile: 128 rows, 16 per warp of the software-pipelined program's 8 warps, 64 per consumer
# warpgroup of the warp-specialised one; key tiles are one head dim (128) wide.
BLOCK_M = TILE
NUM_WARPS = 8


def _tma_strides(t) -> list:
    """``t``'s strides for a TMA descriptor: a dim of size 1 is only ever addressed at 0, so its stride (which
    PyTorch leaves arbitrary, e.g. on a tensor it already calls contiguous) is replaced by an aligned one."""
    strides = list(t.stride())
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            strides[i] = strides[i + 1] * t.shape[i + 1]
    return strides


def _tma_addressable(t) -> bool:
    """TMA reads ``t`` in place: last dim contiguous, the base and every other stride 16-byte aligned and none 0
    (an expanded dim is copied), dims of size 1 aside."""
    strides = _tma_strides(t)
    return (strides[-1] == 1 and t.data_ptr() % 16 == 0
            and all(st > 0 and (st * t.element_size()) % 16 == 0 for st in strides[:-1]))


def _descriptors(q, k, v, q_rows: int, kv_rows: int) -> tuple:
    """4-D TMA descriptors of q, k and v whose tiles are ``[1, 1, rows, D]``: one (batch, head) at a time."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    el = gl.float16 if q.dtype == torch.float16 else gl.bfloat16

    def descriptor(t, rows):
        block = [1, 1, rows, t.shape[-1]]
        return TensorDescriptor(t, list(t.shape), _tma_strides(t), block,
                                gl.NVMMASharedLayout.get_default_for(block, el))

    return descriptor(q, q_rows), descriptor(k, kv_rows), descriptor(v, kv_rows)


def streaming_prefill_hopper(q, k, v, sink, window, scale: Optional[float] = None, *, stages: int = 3,
                             warp_specialized: bool = False, pingpong: bool = False, persistent: bool = False,
                             consumer_regs: int = 240, producer_regs: int = 24):
    """Causal streaming attention of ``[B, H, Sq, D]`` q and ``[B, Hkv, Sk, D]`` k / v on sm_90; returns a
    contiguous ``[B, H, Sq, D]`` output. ``sink`` and ``window`` are one integer each, or one per query head (each
    query tile then reads its head's rule on the device).

    The inputs are read in place through 4-D TMA descriptors when TMA can address them (last dim contiguous, the
    other strides and the base 16-byte aligned: contiguous tensors and ``[B, S, H, D]`` tensors transposed to
    ``[B, H, S, D]`` alike); otherwise a contiguous copy is made. Tiles past a head's sequence are zero-filled by
    the copy engine, so no program reads another head's rows. ``stages`` K/V stages (>= 2; 3 fill sm_90's shared
    memory with 128 x 128 tiles); ``warp_specialized`` runs the producer / two-consumer program; ``pingpong``
    makes its consumers take turns at issuing MMAs; ``persistent`` (warp-specialised only) launches one program
    per SM, each running every ``num_programs``-th query tile with its K/V ring and next Q loads crossing tile
    ends. Arguments the programs do not take raise ValueError (:func:`check_arguments`)."""
    import torch

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_arguments(q, k, v, sink, window, scale, stages, warp_specialized, persistent)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    if Sq == 0 or Sk == 0:   # no query, or no key to keep: the rule's output is empty / zeros
        return torch.zeros((B, H, Sq, D), dtype=q.dtype, device=q.device)
    # The same keys; bounds stay within int32.
    sinks, windows = kernel_rules(per_head_values(sink, H, "sink"), per_head_values(window, H, "window"), Sq, Sk)
    return _launch(q, k, v, None, sinks, windows, scale, stages, warp_specialized, pingpong, persistent,
                   consumer_regs, producer_regs)


def block_table_prefill_hopper(q, k, v, table, scale: Optional[float] = None, *, stages: int = 3,
                               warp_specialized: bool = False, pingpong: bool = False, persistent: bool = False,
                               consumer_regs: int = 240, producer_regs: int = 24):
    """Causal block-table attention (docs/spec.md, block_sparse's table semantics: a kept partial block applies
    causality and the sequence end, a full block keeps every key) on sm_90, with the same programs and arguments
    as :func:`streaming_prefill_hopper`; ``Sq == Sk`` and 128 x 128 table blocks (:func:`check_table`).

    Each program walks its query block's list of key blocks (partial ones first) from one int32 row per
    (table batch, table head, query block) that ``hopper_prefill.program_blocks`` builds on the device."""
    import torch

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_arguments(q, k, v, 0, 1, scale, stages, warp_specialized, persistent)
    check_table(table, q, k)
    B, H, Sq, D = q.shape
    if Sq == 0:
        return torch.zeros((B, H, Sq, D), dtype=q.dtype, device=q.device)
    rows = (program_blocks(table, q.device), *table.kv_num_blocks.shape[:2])
    return _launch(q, k, v, rows, [0], [1], scale, stages, warp_specialized, pingpong, persistent, consumer_regs,
                   producer_regs)


def _launch(q, k, v, blocks, sinks, windows, scale, stages, warp_specialized, pingpong, persistent, consumer_regs,
            producer_regs):
    """Launch the programs over ``B * H * cdiv(Sq, 128)`` query tiles, one program per tile or (``persistent``) one
    per SM: the streaming layout (``blocks`` None; ``sinks`` / ``windows`` per head in kernel form, one rule as two
    scalars, several as two device vectors) or a block table's rows (``blocks`` = (rows, table batches, table
    heads))."""
    import torch

    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out = torch.empty((B, H, Sq, D), dtype=q.dtype, device=q.device)
    q, k, v = (t if _tma_addressable(t) else t.contiguous() for t in (q, k, v))
    q_desc, k_desc, v_desc = _descriptors(q, k, v, BLOCK_M // 2 if warp_specialized else BLOCK_M, D)
    n_tiles = B * H * triton.cdiv(Sq, BLOCK_M)
    grid = (min(n_tiles, sm_count(q.device)) if persistent else n_tiles,)
    # The streaming programs never read the table, nor one rule's programs the rule vectors: out stands in for them.
    table, batches, heads = (out, 1, 1) if blocks is None else blocks
    per_head = per_head_rules(sinks, windows)
    rule_sinks, rule_windows = rule_vectors(tuple(sinks), tuple(windows), q) if per_head else (out, out)
    args = (q_desc, k_desc, v_desc, out, table, table.shape[-1] if blocks is not None else 1, batches, heads, Sq, Sk,
            sinks[0], windows[0], rule_sinks, rule_windows, scale * LOG2E.value)
    common = dict(H=H, GROUP=H // Hkv, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=D, STAGES=stages,
                  TABLE=blocks is not None, PER_HEAD=per_head)
    if warp_specialized:
        _streaming_prefill_ws_kernel[grid](*args, n_tiles, PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs,
                                           PINGPONG=pingpong, num_warps=4, **common)
    else:
        _streaming_prefill_kernel[grid](*args, num_warps=NUM_WARPS, **common)
    return out
