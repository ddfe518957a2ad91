"""The judging half of bench/targets.py: each target's minimum (TARGETS.md), the workloads the table names, and one
evaluator per group that turns a bench's ``--json`` rows into met / missed / reported rows.

Nothing here times anything or needs a GPU: bench/targets.py runs the benches and builds the table from these rows,
and tests/test_bench_targets.py judges hand-written rows through the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

MET, MISSED, REPORT = "met", "missed", "report"
NOT_MEASURED, SKIPPED, NOT_RUN, ERROR = "not measured", "skipped", "not run", "error"

PREFILL_HKV = 8
STREAM_LENGTHS = (16384, 32768, 65536, 131072)
FLEX_LENGTHS = (32768, 65536, 131072)
RANDOM_LENGTHS = (16384, 32768, 65536)
RANDOM_JUDGED = (32768, 65536)   # 16K is reported only
DENSE_LENGTHS = (8192, 32768)   # TARGETS.md's dense-spec lengths
DECODE_BATCHES, DECODE_JUDGED_BATCH, DECODE_LENGTHS = (8, 1, 32), 8, (32768, 131072)   # B=1, B=32 reported
FFN_SPARSITIES = (0.5, 0.7, 0.9)
GATE_SPARSITIES = (0.5, 0.9)
BATCH_TOKENS = (2, 4, 8, 16)
BATCH_SPARSITY = 0.7
JUDGED_DTYPE = "float16"   # the FFN targets are set in fp16; other dtypes are reported
FFN_DTYPES = "float16,bfloat16"
BSR_JUDGED = "bsr x[8192,4096]->14336 64x64"
BSR_REPORTED = "bsr x[8192,14336]->4096 64x64 10%"
SEMI_TOKENS = 8192

# The targets: minimum ratios against each anchor (TARGETS.md); decode's kept K/V rate in TB/s.
PREFILL_OF_IDEAL, PREFILL_X_FLEX, RANDOM_OF_IDEAL, DENSE_X_SDPA = 0.95, 1.5, 0.85, 0.98
DECODE_X_SDPA, DECODE_TBS = {32768: 6.5, 131072: 26.0}, 3.6
FFN_X_DENSE, GATE_X_DENSE, BATCH_X_DENSE = {0.5: 1.8, 0.7: 3.0, 0.9: 7.0}, {0.5: 1.3, 0.9: 2.2}, 1.3
BSR_X_CUBLAS, SEMI_X_INDUCTOR = {"10%": 7.0, "50%": 1.6}, 1.5   # block-sparse: density -> x cuBLAS


@dataclass
class TargetRow:
    """One line of the table: what was measured against which anchor, and the verdict."""

    group: str
    workload: str
    measured: str
    anchor: str
    target: str
    verdict: str
    value: Optional[float] = None   # the judged number, for targets.json


# ------------------------------------------------------------------ judging


def finite(x) -> Optional[float]:
    """``x`` as a float, or None when it is missing, NaN or infinite (a column the bench did not time)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def ratio(row: Optional[dict], numerator: str, denominator: str) -> Optional[float]:
    """``row[numerator] / row[denominator]`` (times: the anchor's over the kernel's), or None when the row or
    either figure is missing or not finite."""
    if row is None:
        return None
    num, den = finite(row.get(numerator)), finite(row.get(denominator))
    return num / den if num is not None and den else None


def judge(value: Optional[float], minimum: float, strict: bool = False) -> str:
    """met / missed against ``minimum`` (``strict``: the value must exceed it); not measured without a value."""
    if value is None:
        return NOT_MEASURED
    return MET if (value > minimum if strict else value >= minimum) else MISSED


def fmt(value: Optional[float], threshold: Optional[float] = None, unit: str = "x") -> str:
    """``value`` with two decimals, three where two would print the threshold itself (0.946 is not 0.95)."""
    if value is None:
        return "-"
    digits = 3 if threshold is not None and round(value, 2) == round(threshold, 2) and value != threshold else 2
    return f"{value:.{digits}f}{unit}"


def target_row(group, workload, value, minimum, anchor, unit="x", strict=False, extra="") -> TargetRow:
    """A judged row: ``value`` (None: not measured) against ``minimum``."""
    measured = fmt(value, minimum, unit) + (f" ({extra})" if extra and value is not None else "")
    sign = ">" if strict else ">="
    return TargetRow(group, workload, measured, anchor, f"{sign} {minimum:g}{unit}", judge(value, minimum, strict),
                     value)


def report_row(group, workload, value, anchor, unit="x", measured=None) -> TargetRow:
    """A row reported beside the targets, with no verdict of its own (not measured without a ``value``)."""
    return TargetRow(group, workload, measured or fmt(value, unit=unit), anchor, "-",
                     NOT_MEASURED if value is None else REPORT, value)


def first_row(rows: List[dict], **match) -> Optional[dict]:
    """The first row whose keys equal ``match`` (floats compared to 1e-9), or None."""
    def equal(a, b):
        return abs(a - b) < 1e-9 if isinstance(a, float) or isinstance(b, float) else a == b
    return next((r for r in rows if all(k in r and equal(r[k], v) for k, v in match.items())), None)


def field(row: Optional[dict], key: str) -> Optional[float]:
    """``row[key]`` when the row and a finite value are there, else None."""
    return None if row is None else finite(row.get(key))


def _pct(sparsity: float) -> str:
    return f"{sparsity:.0%}"


# ------------------------------------------------------------------ one evaluator per group


def evaluate_prefill(data: dict) -> List[TargetRow]:
    """bench/prefill_hopper.py --json rows: shipped of ideal and shipped x Flex (streaming), random of ideal."""
    rows = data.get("rows", [])
    out = []
    ideal_anchor = "SDPA causal x kept share"
    for s in STREAM_LENGTHS:
        r = first_row(rows, layout="streaming", s=s, hkv=PREFILL_HKV)
        out.append(target_row("prefill", f"streaming {s // 1024}K, shipped of ideal", field(r, "shipped_of_ideal"),
                              PREFILL_OF_IDEAL, ideal_anchor, unit=" of ideal"))
        if s in FLEX_LENGTHS:
            out.append(target_row("prefill", f"streaming {s // 1024}K, shipped x Flex", field(r, "shipped_x_flex"),
                                  PREFILL_X_FLEX, "Flex-Triton, same mask"))
    for s in RANDOM_LENGTHS:
        r = first_row(rows, layout="random", s=s, hkv=PREFILL_HKV)
        value = field(r, "shipped_of_ideal")
        name = f"random ~10% {s // 1024}K, shipped of ideal"
        if s in RANDOM_JUDGED:
            out.append(target_row("prefill", name, value, RANDOM_OF_IDEAL, ideal_anchor, unit=" of ideal"))
        else:
            out.append(report_row("prefill", name, value, ideal_anchor, unit=" of ideal"))
    return out


def evaluate_dense(data: dict) -> List[TargetRow]:
    """bench/attention.py rows of kind "dense": the dense spec through sparsecc's op against SDPA."""
    rows = [r for r in data.get("rows", []) if r.get("kind") == "dense"]
    if not rows:
        return [target_row("dense", "dense spec", None, DENSE_X_SDPA, "SDPA")]
    return [target_row("dense", f"{r['workload']} (Hkv {r.get('hkv', '?')})", ratio(r, "sdpa", "ours"),
                       DENSE_X_SDPA, "SDPA causal") for r in rows]


def evaluate_decode(data: dict) -> List[TargetRow]:
    """bench/decode_kernel.py --json: x SDPA and kept TB/s under graph replay at B=8; B=1 and B=32 reported."""
    rows = data.get("rows", [])
    read = finite(data.get("ceilings", {}).get("read_tbs"))
    tbs_anchor = f"read ceiling {read:.2f} TB/s" if read else "kept K/V bytes / graph time"
    sdpa_anchor = "SDPA over the cache, graph replay"
    out = []
    for b in DECODE_BATCHES:
        for kv in DECODE_LENGTHS:
            r, name = first_row(rows, b=b, kv=kv), f"B{b} KV {kv // 1024}K, graph replay"
            if b == DECODE_JUDGED_BATCH:
                out.append(target_row("decode", name, field(r, "new_x_graph"), DECODE_X_SDPA[kv], sdpa_anchor))
                out.append(target_row("decode", f"B{b} KV {kv // 1024}K, kept K/V read", field(r, "new_tbs"),
                                      DECODE_TBS, tbs_anchor, unit=" TB/s"))
            else:
                out.append(report_row("decode", name, field(r, "new_x_graph"), sdpa_anchor, measured=(
                    f"{fmt(field(r, 'new_x_graph'))}, {fmt(field(r, 'new_tbs'), unit=' TB/s')}")))
    return out


def ffn_graph_anchor(data: dict) -> str:
    """The FFN benches' anchor, saying how their graph replays were timed: with the host's submission hidden
    behind GPU work (``graph_submit_hidden`` in the file, bench/linear.py's ``bench_graph``) or exposed, from an idle
    GPU (files written before that key existed were all timed so)."""
    how = "submission hidden" if data.get("graph_submit_hidden") else "submission exposed"
    return f"dense cuBLAS FFN, graph replay ({how})"


def _one_token_rows(group: str, mode: str, data: dict, minimums: Dict[float, float], time_key: str,
                    beside: Optional[Callable[[Optional[dict], float], List[TargetRow]]] = None,
                    report_sparsities: Optional[Tuple[float, ...]] = None) -> List[TargetRow]:
    """One-token FFN rows: ``time_key`` x dense judged in fp16 at each sparsity of ``minimums`` (followed by
    ``beside(row, sparsity)``'s rows), then the other dtypes' rows reported (at ``report_sparsities``; None: all)."""
    anchor = ffn_graph_anchor(data)
    rows = data.get("rows", [])
    out = []
    for s, minimum in minimums.items():
        r = first_row(rows, tokens=1, sparsity=s, dtype=JUDGED_DTYPE)
        out.append(target_row(group, f"{mode} 1 token {_pct(s)} fp16", ratio(r, "dense_ms", time_key), minimum,
                              anchor))
        out.extend(beside(r, s) if beside else [])
    for r in rows:
        if r.get("tokens") == 1 and r.get("dtype") != JUDGED_DTYPE and (
                report_sparsities is None or r.get("sparsity") in report_sparsities):
            out.append(report_row(group, f"{mode} 1 token {_pct(r['sparsity'])} {r['dtype']}",
                                  ratio(r, "dense_ms", time_key), anchor))
    return out


def evaluate_ffn(data: dict) -> List[TargetRow]:
    """bench/ffn_input.py --json at one token: fused x dense (fp16 judged, others reported) and fused x TEAL; where
    the run timed the op's one-launch and two-launch forms, each x dense is reported beside."""
    def beside(r, s):
        name = f"input mode 1 token {_pct(s)} fp16, fused x TEAL"
        if r is not None and field(r, "teal_ms") is None:   # TEAL's kernel is optional: no anchor, no verdict
            out = [TargetRow("ffn", name, "-", "TEAL's kernel not given (--teal)", "> 1x", SKIPPED)]
        else:
            out = [target_row("ffn", name, ratio(r, "teal_ms", "fused_ms"), 1.0, "TEAL's sparse GEMV, same run",
                              strict=True)]
        for key, form in (("one_launch_ms", "one launch"), ("two_launch_ms", "two launches")):
            if r is not None and field(r, key) is not None:
                out.append(report_row("ffn", f"input mode 1 token {_pct(s)} fp16, {form}",
                                      ratio(r, "dense_ms", key), ffn_graph_anchor(data)))
        return out

    return _one_token_rows("ffn", "input mode", data, FFN_X_DENSE, "fused_ms", beside=beside)


def evaluate_gate(data: dict) -> List[TargetRow]:
    """bench/ffn_gate.py --json at one token: gate x dense, fp16 judged, other dtypes reported."""
    return _one_token_rows("gate", "gate mode", data, GATE_X_DENSE, "gate_ms",
                           report_sparsities=GATE_SPARSITIES)


def planned_ffn_form(tokens: int, fused_max_tokens: Optional[int] = None) -> str:
    """The ffn_input.py column of the form the compiler plans for an input-mode FFN site of ``tokens`` tokens."""
    if fused_max_tokens is None:
        from sparsecc.passes.ffn import FUSED_FFN_MAX_TOKENS as fused_max_tokens
    return "fused" if tokens <= fused_max_tokens else "three_op"


def evaluate_batch(data: dict, fused_max_tokens: Optional[int] = None) -> List[TargetRow]:
    """bench/ffn_input.py --json at 2-16 tokens and 70%: the planned form x dense, fp16 judged."""
    rows = data.get("rows", [])
    anchor = ffn_graph_anchor(data)
    out = []

    def planned(r):
        """(planned form x dense, which form that is and the other form's ratio beside it)."""
        form = planned_ffn_form(r["tokens"], fused_max_tokens)
        other = "three_op" if form == "fused" else "fused"
        beside = f"{form.replace('_', '-')}; {other.replace('_', '-')} {fmt(ratio(r, 'dense_ms', other + '_ms'))}"
        return ratio(r, "dense_ms", f"{form}_ms"), beside

    for m in BATCH_TOKENS:
        r = first_row(rows, tokens=m, sparsity=BATCH_SPARSITY, dtype=JUDGED_DTYPE)
        value, beside = planned(r) if r else (None, "")
        out.append(target_row("batch", f"input mode {m} tokens {_pct(BATCH_SPARSITY)} fp16", value, BATCH_X_DENSE,
                              anchor, extra=beside))
    for r in rows:
        if r.get("tokens") in BATCH_TOKENS and r.get("dtype") != JUDGED_DTYPE and r.get("sparsity") == BATCH_SPARSITY:
            value, beside = planned(r)
            out.append(report_row("batch", f"input mode {r['tokens']} tokens {_pct(BATCH_SPARSITY)} {r['dtype']}",
                                  value, anchor, measured=f"{fmt(value)} ({beside})"))
    return out


def evaluate_bsr(data: dict) -> List[TargetRow]:
    """bench/linear.py --json block-sparse rows: sparsecc x cuBLAS at 10% and 50% density (torch BSR beside)."""
    rows = data.get("rows", [])
    out = []

    def ratio_and_anchor(r):
        torch_bsr = ratio(r, "dense", "anchor")   # torch's bsr_dense_mm, timed in the same run
        anchor = "cuBLAS F.linear" + (f" (torch BSR {fmt(torch_bsr)})" if torch_bsr else "")
        return ratio(r, "dense", "sparsecc"), anchor

    for density, minimum in BSR_X_CUBLAS.items():
        name = f"{BSR_JUDGED} {density}"
        value, anchor = ratio_and_anchor(first_row(rows, workload=name))
        out.append(target_row("bsr", name, value, minimum, anchor))
    value, anchor = ratio_and_anchor(first_row(rows, workload=BSR_REPORTED))
    out.append(report_row("bsr", BSR_REPORTED, value, anchor))
    return out


def evaluate_semi(data: dict) -> List[TargetRow]:
    """bench/semi_compiled.py --json: 2:4 + bias + SiLU compiled by sparsecc x the dense module by Inductor."""
    r = first_row(data.get("rows", []), tokens=SEMI_TOKENS)
    value = ratio(r, "inductor_ms", "sparsecc_ms")
    calls = "CUDA-graph replay" if data.get("cudagraphs") else "plain calls"
    return [target_row("semi", f"2:4 + bias + SiLU, M={SEMI_TOKENS}", value, SEMI_X_INDUCTOR,
                       f"Inductor dense, {calls}")]
