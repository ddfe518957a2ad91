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
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules

from target_verdicts import (  # noqa: E402  (the judging half)
    BATCH_SPARSITY, BATCH_TOKENS, DECODE_BATCHES, DENSE_LENGTHS, ERROR, FFN_DTYPES, FFN_SPARSITIES, GATE_SPARSITIES,
    MET, MISSED, NOT_MEASURED, NOT_RUN, PREFILL_HKV, RANDOM_LENGTHS, REPORT, SEMI_TOKENS, SKIPPED, STREAM_LENGTHS,
    TargetRow, evaluate_batch, evaluate_bsr, evaluate_decode, evaluate_dense, evaluate_ffn, evaluate_gate,
    evaluate_prefill, evaluate_semi
)

AUTOTUNE_ENV = "SPARSECC_AUTOTUNE"   # "first" keeps one config per autotuner (codegen/block_attention_kernels.py)
SHIPPED_VARIANT = "pp3p"   # codegen/hopper_prefill.py VARIANT; the "shipped" column times the wrapper whatever it runs


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
