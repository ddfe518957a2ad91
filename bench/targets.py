"""Every kernel target of TARGETS.md measured by the benches that own it, and one table of met / missed.

    python bench/targets.py [--groups prefill,dense,decode,ffn,gate,batch,bsr,semi] [--out DIR] [--rounds N]
                            [--teal .carry/teal/sparse_gemv.py] [--dry-run]
    python bench/targets.py --collect DIR [DIR ...] [--out DIR]

Each group runs one bench's own ``main(argv)`` in this process with ``--json DIR/<group>.json`` (``dense`` calls
bench/attention.py's ``run_dense_dispatch``: that script's ``main`` times its whole suite and appends to
RESULTS.md); ``DIR/<group>.run.json`` records the device, versions, date, source, command, seconds and any error.
A failing group is recorded and the next one runs (the exit status is then 1). The table of every target is
printed last and written to ``DIR/targets.json`` and ``DIR/targets.md``; a group with no files in DIR reads "not
run". ``--collect`` builds the table from earlier runs' files, without a GPU; of several DIRs, each group's files
come from the last DIR holding them. Every ratio is its bench's, against an anchor timed in the same process. The
FFN targets are judged in float16 (bfloat16 reported), the batch target on the form the compiler plans at that
many tokens (``FUSED_FFN_MAX_TOKENS`` of passes/ffn.py, read when the table is built).

| group | bench: workloads | device time, estimated |
|---|---|---|
| prefill | prefill_hopper.py: streaming 16K-128K, random ~10% 16K-64K, Hkv 8, pp3p, Flex, --rounds 5 | 6-7 min |
| dense | attention.py run_dense_dispatch: 8K, 32K | < 1 min |
| decode | decode_kernel.py --batches 8,1,32 | 1-2 min |
| ffn | ffn_input.py: 1 token, 50 / 70 / 90%, fp16 and bf16, TEAL's kernel when given, one and two launches | about 2 min |
| gate | ffn_gate.py: 1 token, 50 / 90%, fp16 and bf16 | about 1 min |
| batch | ffn_input.py: 2 / 4 / 8 / 16 tokens, 70%, fp16 and bf16 | about 2 min |
| bsr | linear.py --only bsr | 1-2 min |
| semi | semi_compiled.py --tokens 8192 | about 2 min |

Estimated from the runs in bench/RESULTS.md (the prefill run with two Gluon variants, Flex, the random layouts and
--rounds 5 finished inside one 10-minute run; this one times one variant) on a fresh machine, whose Triton, Flex
and Inductor caches are empty. The seconds each group took are in its run file and the table. In runs of at most
600 s each, into one DIR or joined by ``--collect``::

    python bench/targets.py --groups prefill --out OUT/targets                      # 6-7 min
    python bench/targets.py --groups dense,decode,ffn,gate --out OUT/targets        # about 5 min
    python bench/targets.py --groups batch,bsr,semi --out OUT/targets               # about 5 min
    python bench/targets.py --collect OUT1/targets OUT2/targets OUT3/targets --out /tmp/targets   # no GPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import math
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules

MET, MISSED, REPORT = "met", "missed", "report"
NOT_MEASURED, SKIPPED, NOT_RUN, ERROR = "not measured", "skipped", "not run", "error"
AUTOTUNE_ENV = "SPARSECC_AUTOTUNE"   # "first" keeps one config per autotuner (codegen/block_attention_kernels.py)

PREFILL_HKV = 8
STREAM_LENGTHS = (16384, 32768, 65536, 131072)
FLEX_LENGTHS = (32768, 65536, 131072)
RANDOM_LENGTHS = (16384, 32768, 65536)
RANDOM_JUDGED = (32768, 65536)   # 16K is reported only
SHIPPED_VARIANT = "pp3p"   # codegen/hopper_prefill.py VARIANT; the "shipped" column times the wrapper whatever it runs
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


# ------------------------------------------------------------------ groups


@dataclass(frozen=True)
class Group:
    """One bench run: the module whose ``main(argv)`` runs it, its arguments, and the evaluator of its rows."""

    name: str
    title: str   # what the group measures, for its error and "not run" rows
    module: str
    evaluate: Callable[[dict], List[TargetRow]]
    estimate_s: int   # device seconds, fresh machine (module docstring)
    argv: Callable[[str, argparse.Namespace], List[str]]   # (json path, options) -> the bench's arguments
    run: Optional[Callable[[List[str]], object]] = None   # None: the module's main


def _csv(values) -> str:
    return ",".join(map(str, values))


def run_dense(argv: List[str]) -> int:
    """bench/attention.py's dense-spec timing at ``--lengths``, its rows written to ``--json`` in attention.py's
    own schema (its ``main`` would time the whole attention suite and append to RESULTS.md)."""
    import attention

    ap = argparse.ArgumentParser(description="dense spec through sparsecc's op against SDPA (bench/attention.py)")
    ap.add_argument("--lengths", default=_csv(DENSE_LENGTHS))
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    rows: List[dict] = []
    for s in (int(x) for x in args.lengths.split(",")):
        attention.run_dense_dispatch(rows, lambda msg: print(msg, flush=True), s)
        with open(args.json, "w") as f:
            json.dump(dict(header=[], rows=rows), f, indent=1)
    return 0


GROUPS = (   # in the table's order
    Group("prefill", "streaming and random ~10% prefill", "prefill_hopper", evaluate_prefill, 420, lambda path, o: [
        "--lengths", _csv(STREAM_LENGTHS), "--hkv", str(PREFILL_HKV), "--variants", SHIPPED_VARIANT, "--flex",
        "--random", _csv(RANDOM_LENGTHS), "--rounds", str(o.rounds), "--json", path]),
    Group("dense", "dense spec", "attention", evaluate_dense, 30, lambda path, o: [
        "--lengths", _csv(DENSE_LENGTHS), "--json", path], run=run_dense),
    Group("decode", "decode attention", "decode_kernel", evaluate_decode, 90, lambda path, o: [
        "--batches", _csv(DECODE_BATCHES), "--json", path]),
    Group("ffn", "one-token FFN, input mode", "ffn_input", evaluate_ffn, 120, lambda path, o: [
        "--tokens", "1", "--sparsities", _csv(FFN_SPARSITIES), "--dtypes", FFN_DTYPES, "--teal", o.teal,
        "--json", path]),
    Group("gate", "one-token FFN, gate mode", "ffn_gate", evaluate_gate, 60, lambda path, o: [
        "--tokens", "1", "--sparsities", _csv(GATE_SPARSITIES), "--dtypes", FFN_DTYPES, "--json", path]),
    # no TEAL file for batch: its kernel serves one token only
    Group("batch", "2-16 token FFN, input mode", "ffn_input", evaluate_batch, 120, lambda path, o: [
        "--tokens", _csv(BATCH_TOKENS), "--sparsities", str(BATCH_SPARSITY), "--dtypes", FFN_DTYPES, "--teal", "",
        "--json", path]),
    Group("bsr", "block-sparse linear", "linear", evaluate_bsr, 90, lambda path, o: [
        "--only", "bsr", "--json", path]),
    Group("semi", "2:4 linear + bias + SiLU", "semi_compiled", evaluate_semi, 120, lambda path, o: [
        "--tokens", str(SEMI_TOKENS), "--json", path]),
)
GROUP_BY_NAME = {g.name: g for g in GROUPS}


def command_line(group: Group, argv: List[str]) -> str:
    """How the group's bench would be called from a shell (for the log and the table's group lines)."""
    entry = "run_dense_dispatch " if group.run is run_dense else ""
    return f"bench/{group.module}.py {entry}" + " ".join(a if a else "''" for a in argv)


def run_provenance() -> dict:
    """Device, versions, date and source of this process, recorded with every group it runs."""
    import torch
    import triton
    from provenance import source_version

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": str(datetime.date.today()), "source": source_version(),
            "autotune": os.environ.get(AUTOTUNE_ENV, "")}


def write_json(path: str, payload) -> None:
    """``payload`` as indented JSON at ``path``."""
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def run_group(group: Group, out_dir: str, options: argparse.Namespace, provenance: dict) -> dict:
    """Run ``group`` and return its run record (also in ``out_dir/<group>.run.json``); never raises for the
    bench's own failures, so the next group runs."""
    import torch

    json_path = os.path.join(out_dir, f"{group.name}.json")
    if os.path.exists(json_path):
        os.remove(json_path)   # rows of an earlier run must not pass for this one's
    argv = group.argv(json_path, options)
    info = dict(provenance, group=group.name, command=command_line(group, argv), status="running", error="",
                seconds=None)
    info_path = os.path.join(out_dir, f"{group.name}.run.json")
    write_json(info_path, info)   # a run stopped from outside leaves "running"
    print(f"== {group.name}: {info['command']}", flush=True)
    start, error = time.time(), ""
    try:
        result = (group.run or importlib.import_module(group.module).main)(argv)
        if result not in (None, 0):
            error = f"main returned {result} (its log above says why)"
    except SystemExit as exc:   # the benches exit with a message on a failed check
        if exc.code not in (None, 0):
            error = exc.code if isinstance(exc.code, str) else f"exit status {exc.code}"
    except Exception as exc:   # noqa: BLE001 - one group's failure is recorded, the others still run
        traceback.print_exc()
        error = f"{type(exc).__name__}: {exc}"
    info.update(status=ERROR if error else "done", error=" ".join(error.split())[:300],
                seconds=round(time.time() - start, 1))
    write_json(info_path, info)
    print(f"== {group.name}: {info['status']} in {info['seconds']} s {info['error']}", flush=True)
    try:   # compiled modules and Flex kernels of one group are no use to the next
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    except Exception as exc:   # noqa: BLE001 - a broken CUDA context fails the next groups, with their own errors
        print(f"== {group.name}: clean-up failed: {type(exc).__name__}: {exc}", flush=True)
    return info


# ------------------------------------------------------------------ the table


def load_groups(dirs: List[str]) -> Tuple[Dict[str, dict], Dict[str, dict]]:
    """(rows file, run record) of every group found in ``dirs``; for each group the last dir holding either."""
    data, infos = {}, {}
    for name in GROUP_BY_NAME:
        files = (f"{name}.json", f"{name}.run.json")
        home = next((d for d in reversed(dirs) if any(os.path.exists(os.path.join(d, f)) for f in files)), None)
        if home is None:
            continue
        loaded, errors = [None, None], []
        for i, path in enumerate(os.path.join(home, f) for f in files):
            try:
                with open(path) as fh:
                    loaded[i] = json.load(fh)
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:
                errors.append(f"{path} unreadable: {exc}")
        if loaded[0] is not None:
            data[name] = loaded[0]
        info = dict(loaded[1] or {}, **({"status": ERROR, "error": "; ".join(errors)} if errors else {}))
        if info:
            infos[name] = info
    return data, infos


def target_rows(data: Dict[str, dict], infos: Dict[str, dict]) -> List[TargetRow]:
    """Every target row of every group: its evaluator's rows, an error row where the run failed or did not
    finish, and one "not run" row for a group with no files."""
    rows = []
    for group in GROUPS:
        info, payload = infos.get(group.name), data.get(group.name)
        if info and info.get("status") == ERROR:
            rows.append(TargetRow(group.name, group.title, info.get("error", "") or "failed", "-", "-", ERROR))
        elif info and info.get("status") == "running":   # its run record was never completed
            rows.append(TargetRow(group.name, group.title, "the run did not finish", "-", "-", ERROR))
        elif info and payload is None:
            rows.append(TargetRow(group.name, group.title, "the bench wrote no rows", "-", "-", ERROR))
        if payload is not None:
            try:
                rows.extend(group.evaluate(payload))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                rows.append(TargetRow(group.name, group.title, f"rows unreadable: {type(exc).__name__}: {exc}", "-",
                                      "-", ERROR))
        elif not info:
            rows.append(TargetRow(group.name, group.title, "-", "-", "-", NOT_RUN))
    return rows


def provenance_of(info: Optional[dict], payload: Optional[dict]) -> dict:
    """Device, versions, date and source of a group: from its run record, else what its rows file names."""
    src = info or payload or {}
    return {"device": src.get("device", "?"), "torch": src.get("torch", "?"), "triton": src.get("triton", "?"),
            "date": src.get("date", "?"), "source": src.get("source", src.get("commit", "?"))}


def header(data: Dict[str, dict], infos: Dict[str, dict]) -> Dict[str, str]:
    """Each provenance field over the groups found: one value, or each value with the groups it names."""
    found = [g.name for g in GROUPS if g.name in data or g.name in infos]
    fields: Dict[str, Dict[str, List[str]]] = {}
    for name in found:
        for key, value in provenance_of(infos.get(name), data.get(name)).items():
            fields.setdefault(key, {}).setdefault(str(value), []).append(name)
    out = {}
    for key in ("device", "torch", "triton", "date", "source"):
        values = fields.get(key, {})
        out[key] = (next(iter(values)) if len(values) == 1 else
                    "; ".join(f"{v} ({', '.join(gs)})" for v, gs in values.items()) or "?")
    return out


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def markdown(head: Dict[str, str], data: Dict[str, dict], infos: Dict[str, dict], rows: List[TargetRow]) -> List[str]:
    """The report: provenance, one line per group (status, seconds against the estimate), the target table last."""
    counts = Counter(r.verdict for r in rows)
    lines = ["# sparsecc kernel targets (bench/targets.py)", "",
             f"- device: {head['device']}; torch {head['torch']}; triton {head['triton']}",
             f"- date: {head['date']}; source {head['source']}",
             "- verdicts: " + ", ".join(f"{counts[v]} {v}" for v in (MET, MISSED, NOT_MEASURED, SKIPPED, ERROR,
                                                                       NOT_RUN, REPORT) if v in counts)]
    if any(i.get("autotune") == "first" for i in infos.values()):
        lines.append(f"- {AUTOTUNE_ENV}=first was set: the autotuned kernels kept their first config")
    lines += ["", "| group | status | seconds (estimate) | command |", "|---|---|---|---|"]
    for g in GROUPS:
        info = infos.get(g.name, {})
        status = info.get("status", "rows, no run file" if g.name in data else NOT_RUN)
        seconds = "-" if info.get("seconds") is None else info["seconds"]
        lines.append(f"| {g.name} | {status} | {seconds} ({g.estimate_s}) "
                     f"| {_cell(info.get('command', '-'))} |")
    lines += ["", "| group | workload | measured | anchor | target | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.group} | {_cell(r.workload)} | {_cell(r.measured)} | {_cell(r.anchor)} | {r.target} | "
              f"**{r.verdict}** |" for r in rows]
    return lines


def build_report(dirs: List[str], out_dir: str) -> List[str]:
    """Read every group's files from ``dirs``, write ``out_dir/targets.json`` and ``targets.md``, return the lines
    of the table (written or not: a read-only dir still gets its table printed)."""
    data, infos = load_groups(dirs)
    rows = target_rows(data, infos)
    head = header(data, infos)
    lines = markdown(head, data, infos, rows)
    try:
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "targets.json"),
                   {"header": head, "groups": infos, "rows": [asdict(r) for r in rows]})
        with open(os.path.join(out_dir, "targets.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    except OSError as exc:
        print(f"could not write the table to {out_dir} ({exc}); pass --out", file=sys.stderr)
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    """Run the chosen groups (or only collect earlier runs), then print the table last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default=",".join(GROUP_BY_NAME), help="comma-separated: " + ", ".join(GROUP_BY_NAME))
    ap.add_argument("--out", default=None, help="where the rows and the table go (runs: default /tmp/sparsecc-targets)")
    ap.add_argument("--rounds", type=int, default=5, help="prefill_hopper.py's --rounds")
    ap.add_argument("--teal", default=".carry/teal/sparse_gemv.py", help="TEAL's kernels/sparse_gemv.py (optional)")
    ap.add_argument("--collect", nargs="+", metavar="DIR", help="only build the table from earlier runs' files")
    ap.add_argument("--dry-run", action="store_true", help="print each chosen group's command and estimate")
    args = ap.parse_args(argv)
    if args.collect:
        if not all(os.path.isdir(d) for d in args.collect):
            ap.error(f"--collect: no such directory: {', '.join(d for d in args.collect if not os.path.isdir(d))}")
        print("\n".join(build_report(args.collect, args.out or args.collect[-1])))
        return 0
    names = [n for n in args.groups.split(",") if n]
    unknown = [n for n in names if n not in GROUP_BY_NAME]
    if unknown:
        ap.error(f"unknown group(s) {', '.join(unknown)}; expected some of {', '.join(GROUP_BY_NAME)}")
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds} is not allowed; expected an integer >= 1")
    out_dir = args.out or "/tmp/sparsecc-targets"
    chosen = [g for g in GROUPS if g.name in names]   # the table's order, whatever order was asked
    if args.dry_run:
        for g in chosen:
            argv = g.argv(os.path.join(out_dir, f"{g.name}.json"), args)
            print(f"{g.name:8} ~{g.estimate_s:4d} s  {command_line(g, argv)}")
        print(f"total ~{sum(g.estimate_s for g in chosen)} s")
        return 0
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/targets.py needs a CUDA device to run groups (--collect DIR builds the table without one)")
    os.makedirs(out_dir, exist_ok=True)
    provenance = run_provenance()
    infos = [run_group(g, out_dir, args, provenance) for g in chosen]
    print("\n".join(build_report([out_dir], out_dir)))
    return 1 if any(i["status"] == ERROR for i in infos) else 0


if __name__ == "__main__":
    sys.exit(main())
