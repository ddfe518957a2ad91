"""bench/targets.py and bench/target_verdicts.py turn the benches' JSON rows into met / missed verdicts, and build
the table without a GPU.

Rows are written in each bench's own schema: through the bench's writer where it needs no GPU
(bench/prefill_hopper.py, bench/semi_compiled.py, bench/linear.py's ``Row``), else with the keys its code writes.
"""

import argparse
import dataclasses
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import linear  # noqa: E402
import prefill_hopper  # noqa: E402
import semi_compiled  # noqa: E402
import target_verdicts  # noqa: E402
import targets  # noqa: E402
from target_verdicts import ERROR, MET, MISSED, NOT_MEASURED, NOT_RUN, REPORT, SKIPPED  # noqa: E402


def verdicts(rows):
    return {r.workload: r.verdict for r in rows}


def by_workload(rows):
    return {r.workload: r for r in rows}


def load(path):
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------ rows in each bench's schema


def prefill_file(path, of_ideal_64k=0.96, flex_128k=float("nan")):
    """prefill_hopper.py's --json through its own writer; SDPA 10 ms and kept share 0.1 make shipped of ideal
    = 1 / shipped ms."""
    def row(s, ship_ms, flex_ms):   # time_row's tuple: (s, hkv, density, sdpa, triton, shipped, gluon, best, flex)
        return (s, 8, 0.1, 10.0, 1.3, ship_ms, {"pp3p": ship_ms}, "pp3p", flex_ms)
    streaming = [row(16384, 1.0, 1.4), row(32768, 1.0, 1.6), row(65536, 1 / of_ideal_64k, 1.6),
                 row(131072, 0.95, flex_128k)]
    random = [row(16384, 1.25, 1.3), row(32768, 1.1, 1.3), row(65536, 1 / 0.84, 1.3)]
    meta = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "commit": "abc1234",
            "date": "2026-12-06", "variants": ["pp3p"], "rounds": 5}
    prefill_hopper.write_json(path, meta, streaming, random)


def dense_data(ratio_8k=1.01, ratio_32k=0.97):
    """bench/attention.py rows as run_dense_dispatch writes them."""
    def row(s, ratio):
        return dict(workload=f"dense spec {s // 1024}K", kind="dense", s=s, hkv=32, d=128, ours=1.0 / ratio,
                    sdpa=1.0, flex=float("nan"), density=1.0, target_kind="x_sdpa", target_value=0.98)
    stream = dict(workload="stream 8K", kind="stream", s=8192, hkv=32, d=128, ours=0.5, sdpa=1.0, flex=1.0,
                  density=0.5, target_kind="x_sdpa", target_value=None)
    return {"header": [], "rows": [stream, row(8192, ratio_8k), row(32768, ratio_32k)]}


def decode_data():
    """bench/decode_kernel.py --json: ceilings and one row per (B, KV) with run_workload's keys."""
    def row(b, kv, x_graph, tbs):
        return {"b": b, "kv": kv, "kept_mb": 17.3 * b, "copies": 2, "new_err": 2e-3, "sdpa_normal": 0.26,
                "sdpa_graph": 0.245, "new_normal": 0.07, "new_graph": 0.245 / x_graph, "public_normal": 0.08,
                "new_tbs": tbs, "new_x_graph": x_graph, "new_x_normal": 3.5}
    return {"ceilings": {"copy_tbs": 4.27, "read_tbs": 4.19},
            "rows": [row(8, 32768, 6.6, 3.61), row(8, 131072, 24.2, 3.52), row(1, 32768, 3.2, 1.44),
                     row(1, 131072, 10.6, 1.45), row(32, 32768, 7.3, 4.28), row(32, 131072, 29.0, 4.29)]}


def ffn_row(tokens, sparsity, dtype, dense_us, fused_us, three_op_us=None, teal_us=None):
    """One bench/ffn_input.py row (times in ms, as its ``row`` stores them)."""
    r = {"tokens": tokens, "sparsity": sparsity, "dtype": dtype, "kept_x": 1 - sparsity, "kept_h": 1 - sparsity,
         "kept_mb": 100.0, "dense_err": 0.3, "dense_ms": dense_us / 1e3, "three_op_err": 2e-4,
         "three_op_ms": (three_op_us or fused_us * 1.3) / 1e3, "fused_err": 2e-4, "fused_ms": fused_us / 1e3,
         "weighted_err": 2e-4, "weighted_ms": fused_us * 1.05 / 1e3, "weighted_three_op_err": 2e-4,
         "weighted_three_op_ms": fused_us * 1.35 / 1e3, "tb_s": 2.8, "weighted_kept_mb": 100.0,
         "weighted_tb_s": 2.7}
    if teal_us is not None:
        r.update(teal_err=0.03, teal_ms=teal_us / 1e3)
    return r


def ffn_data(teal=True):
    rows = [ffn_row(1, 0.5, "float16", 100.0, 50.0, teal_us=70.0 if teal else None),     # 2.00x, ahead of TEAL
            ffn_row(1, 0.7, "float16", 100.0, 41.0, teal_us=41.0 if teal else None),     # 2.44x: misses 3.0x
            ffn_row(1, 0.9, "float16", 100.0, 14.0, teal_us=13.0 if teal else None),     # 7.14x, behind TEAL
            ffn_row(1, 0.5, "bfloat16", 100.0, 61.7), ffn_row(1, 0.9, "bfloat16", 100.0, 22.8)]
    return {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "commit": "abc1234", "date": "2026-12-06", "rows": rows}


def gate_data():
    """bench/ffn_gate.py rows (``row``'s keys)."""
    def row(sparsity, dtype, dense_us, gate_us):
        return {"tokens": 1, "sparsity": sparsity, "dtype": dtype, "kept": 1 - sparsity, "ideal": 1.5,
                "gate_err": 2e-4, "dense_ms": dense_us / 1e3, "gate_ms": gate_us / 1e3, "stage1_ms": 0.043,
                "down_ms": 0.025, "tb_s": 3.4}
    return {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "commit": "abc1234", "date": "2026-12-06",
            "rows": [row(0.5, "float16", 100.4, 67.6), row(0.9, "float16", 100.4, 47.0),
                     row(0.5, "bfloat16", 100.6, 67.1), row(0.9, "bfloat16", 101.1, 44.5)]}


def bsr_data():
    """bench/linear.py --json: its header and its ``Row``s as dicts."""
    rows = [linear.Row("bsr x[8192,4096]->14336 64x64 10%", 0.2734, 1.2166, 0.3887, "torch BSR", 10.0, 7.0),
            linear.Row("bsr x[8192,4096]->14336 64x64 50%", 0.75, 1.2166, 1.6, "torch BSR", 2.0, 1.7),
            linear.Row("bsr x[8192,14336]->4096 64x64 10%", 0.2444, 1.3418, 0.41, "torch BSR", 10.0, 7.0),
            linear.Row("bsr x[8192,4096]->14336 64x64 10% +bias+silu", 0.5015, 1.51, None, "torch BSR", 10.0, 7.0)]
    return {"header": "device NVIDIA H200, torch 2.11.0+cu130, 2026-12-06, commit abc1234, torch.bfloat16",
            "rows": [r.__dict__ for r in rows]}


def semi_file(path, sparse_ms=1.06, inductor_ms=1.60):
    meta = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "commit": "abc1234", "date": "2026-12-06",
            "cudagraphs": False}
    semi_compiled.write_json(path, meta, [(8192, 2.6e-3, sparse_ms, inductor_ms)])


# ------------------------------------------------------------------ verdicts per group


def test_prefill_rows_from_the_bench_writer(tmp_path):
    prefill_file(tmp_path / "prefill.json", of_ideal_64k=0.946)
    data = load(tmp_path / "prefill.json")
    assert data["rows"][0]["layout"] == "streaming" and data["rows"][3]["flex_ms"] is None   # NaN is written null
    rows = by_workload(target_verdicts.evaluate_prefill(data))
    assert rows["streaming 16K, shipped of ideal"].verdict == MET
    assert rows["streaming 64K, shipped of ideal"].verdict == MISSED
    assert rows["streaming 64K, shipped of ideal"].measured == "0.946 of ideal"   # not "0.95", which would read met
    assert rows["streaming 128K, shipped of ideal"].verdict == MET
    assert rows["streaming 32K, shipped x Flex"].verdict == MET                   # 1.6x
    assert rows["streaming 128K, shipped x Flex"].verdict == NOT_MEASURED        # Flex not timed at 128K
    assert "streaming 16K, shipped x Flex" not in rows                           # the Flex target starts at 32K
    assert rows["random ~10% 16K, shipped of ideal"].verdict == REPORT
    assert rows["random ~10% 32K, shipped of ideal"].verdict == MET
    assert rows["random ~10% 64K, shipped of ideal"].verdict == MISSED           # 0.84 < 0.85


def test_prefill_rows_of_other_head_counts_are_not_judged(tmp_path):
    prefill_file(tmp_path / "prefill.json")
    data = load(tmp_path / "prefill.json")
    for r in data["rows"]:
        r["hkv"] = 32
    assert set(verdicts(target_verdicts.evaluate_prefill(data)).values()) == {NOT_MEASURED}   # reported rows too


def test_dense_spec_rows_of_attention_py(tmp_path, monkeypatch):
    rows = verdicts(target_verdicts.evaluate_dense(dense_data(ratio_8k=1.01, ratio_32k=0.97)))
    assert rows == {"dense spec 8K (Hkv 32)": MET, "dense spec 32K (Hkv 32)": MISSED}   # the stream row is ignored
    assert verdicts(target_verdicts.evaluate_dense({"header": [], "rows": []})) == {"dense spec": NOT_MEASURED}

    import attention   # run_dense keeps attention.py's own row schema

    def fake_dispatch(rows, log, s):
        rows.append(dense_data(ratio_32k=1.02)["rows"][2 if s == 32768 else 1])
    monkeypatch.setattr(attention, "run_dense_dispatch", fake_dispatch)
    assert targets.run_dense(["--lengths", "8192,32768", "--json", str(tmp_path / "dense.json")]) == 0
    assert set(verdicts(target_verdicts.evaluate_dense(load(tmp_path / "dense.json"))).values()) == {MET}


def test_decode_targets_at_b8_and_the_other_batches_reported():
    rows = by_workload(target_verdicts.evaluate_decode(decode_data()))
    assert rows["B8 KV 32K, graph replay"].verdict == MET                 # 6.6 >= 6.5
    assert rows["B8 KV 128K, graph replay"].verdict == MISSED             # 24.2 < 26
    assert rows["B8 KV 32K, kept K/V read"].verdict == MET                # 3.61 TB/s
    assert rows["B8 KV 128K, kept K/V read"].verdict == MISSED            # 3.52 TB/s
    assert rows["B8 KV 128K, kept K/V read"].target == ">= 3.6 TB/s"
    assert rows["B32 KV 128K, graph replay"].verdict == REPORT
    assert rows["B32 KV 128K, graph replay"].measured == "29.00x, 4.29 TB/s"
    assert rows["B1 KV 32K, graph replay"].measured == "3.20x, 1.44 TB/s"


def test_ffn_input_mode_with_teal_in_the_same_run():
    rows = by_workload(target_verdicts.evaluate_ffn(ffn_data(teal=True)))
    assert rows["input mode 1 token 50% fp16"].verdict == MET
    assert rows["input mode 1 token 70% fp16"].verdict == MISSED
    assert rows["input mode 1 token 90% fp16"].verdict == MET
    assert rows["input mode 1 token 50% fp16, fused x TEAL"].verdict == MET
    assert rows["input mode 1 token 70% fp16, fused x TEAL"].verdict == MISSED   # as fast as TEAL is not ahead
    assert rows["input mode 1 token 90% fp16, fused x TEAL"].verdict == MISSED   # 13 us TEAL, 14 us fused
    assert rows["input mode 1 token 50% bfloat16"].verdict == REPORT
    assert rows["input mode 1 token 50% bfloat16"].measured == "1.62x"


def test_ffn_anchor_says_how_graph_replays_were_timed():
    """Files from before bench_graph hid the host's submission carry no flag: their rows say it was exposed; a file
    with the flag says hidden, on every FFN group's rows (input mode, gate mode, 2-16 tokens)."""
    old = by_workload(target_verdicts.evaluate_ffn(ffn_data(teal=True)))
    assert old["input mode 1 token 90% fp16"].anchor == "dense cuBLAS FFN, graph replay (submission exposed)"
    assert old["input mode 1 token 50% bfloat16"].anchor.endswith("(submission exposed)")
    new = {**ffn_data(teal=True), "graph_submit_hidden": True}
    for row in target_verdicts.evaluate_ffn(new):
        if "TEAL" not in row.anchor:
            assert row.anchor == "dense cuBLAS FFN, graph replay (submission hidden)", row
    gate = {**gate_data(), "graph_submit_hidden": True}
    assert all(r.anchor.endswith("(submission hidden)") for r in target_verdicts.evaluate_gate(gate))
    assert all(r.anchor.endswith("(submission exposed)") for r in target_verdicts.evaluate_gate(gate_data()))
    batch = [ffn_row(m, 0.7, "float16", 100.0, fused_us=60.0) for m in (2, 4, 8, 16)]
    assert all(r.anchor.endswith("(submission hidden)")
               for r in target_verdicts.evaluate_batch({"rows": batch, "graph_submit_hidden": True},
                                                       fused_max_tokens=2))


def test_ffn_one_and_two_launches_are_reported_beside_where_timed():
    """Rows with the op's one-launch and two-launch times report each x dense (no verdict of their own); rows
    without them add nothing."""
    data = ffn_data(teal=True)
    data["rows"][0].update(one_launch_ms=0.040, two_launch_ms=0.050)   # 2.50x and 2.00x of the 100 us dense
    rows = by_workload(target_verdicts.evaluate_ffn(data))
    assert rows["input mode 1 token 50% fp16, one launch"].verdict == REPORT
    assert rows["input mode 1 token 50% fp16, one launch"].measured == "2.50x"
    assert rows["input mode 1 token 50% fp16, two launches"].measured == "2.00x"
    assert not any("launch" in name for name in rows if "70%" in name or "90%" in name)


def test_ffn_without_teal_skips_that_anchor_only():
    rows = by_workload(target_verdicts.evaluate_ffn(ffn_data(teal=False)))
    assert all(rows[f"input mode 1 token {p} fp16, fused x TEAL"].verdict == SKIPPED for p in ("50%", "70%", "90%"))
    assert rows["input mode 1 token 50% fp16"].verdict == MET
    assert rows["input mode 1 token 70% fp16"].verdict == MISSED


def test_gate_mode():
    rows = verdicts(target_verdicts.evaluate_gate(gate_data()))
    assert rows == {"gate mode 1 token 50% fp16": MET, "gate mode 1 token 90% fp16": MISSED,
                    "gate mode 1 token 50% bfloat16": REPORT, "gate mode 1 token 90% bfloat16": REPORT}


def test_batch_is_judged_on_the_form_the_compiler_plans():
    # fused at 1.5x but the per-projection GEMVs (planned above one token here, fused_max_tokens=1) at 1.1x: missed
    rows = [ffn_row(m, 0.7, "float16", 100.0, fused_us=100 / 1.5, three_op_us=100 / 1.1) for m in (2, 4, 8)]
    rows.append(ffn_row(16, 0.7, "float16", 100.0, fused_us=200.0, three_op_us=100 / 1.4))
    rows.append(ffn_row(4, 0.7, "bfloat16", 100.0, fused_us=120.0, three_op_us=105.0))
    out = by_workload(target_verdicts.evaluate_batch({"rows": rows}, fused_max_tokens=1))
    assert out["input mode 2 tokens 70% fp16"].verdict == MISSED
    assert out["input mode 2 tokens 70% fp16"].measured == "1.10x (three-op; fused 1.50x)"
    assert out["input mode 16 tokens 70% fp16"].verdict == MET
    assert out["input mode 4 tokens 70% bfloat16"].verdict == REPORT
    # with the fused op planned up to 8 tokens, the same rows meet the target there
    assert target_verdicts.evaluate_batch({"rows": rows}, fused_max_tokens=8)[0].verdict == MET
    from sparsecc.passes.ffn import FUSED_FFN_MAX_TOKENS
    assert target_verdicts.planned_ffn_form(FUSED_FFN_MAX_TOKENS) == "fused"
    assert target_verdicts.planned_ffn_form(FUSED_FFN_MAX_TOKENS + 1) == "three_op"


def test_block_sparse_rows_of_linear_py():
    rows = by_workload(target_verdicts.evaluate_bsr(bsr_data()))
    ten = rows["bsr x[8192,4096]->14336 64x64 10%"]
    assert ten.verdict == MISSED and ten.measured == "4.45x" and "torch BSR 3.13x" in ten.anchor
    assert rows["bsr x[8192,4096]->14336 64x64 50%"].verdict == MET   # 1.62x >= 1.6 (linear.py's own row says 1.7)
    assert rows["bsr x[8192,14336]->4096 64x64 10%"].verdict == REPORT


def test_semi_structured_rows_from_the_bench_writer(tmp_path):
    semi_file(tmp_path / "semi.json", sparse_ms=1.06, inductor_ms=1.60)
    assert verdicts(target_verdicts.evaluate_semi(load(tmp_path / "semi.json"))) == {"2:4 + bias + SiLU, M=8192": MET}
    semi_file(tmp_path / "semi.json", sparse_ms=1.14, inductor_ms=1.61)
    row, = target_verdicts.evaluate_semi(load(tmp_path / "semi.json"))
    assert row.verdict == MISSED and row.measured == "1.41x" and row.anchor == "Inductor dense, plain calls"


def test_semi_bench_refuses_no_rounds_before_touching_the_gpu(capsys):
    with pytest.raises(SystemExit) as exc:
        semi_compiled.main(["--rounds", "0"])
    assert exc.value.code == 2
    assert "--rounds 0 is not allowed; expected an integer >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------ runs and the table


def write(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f)


def test_collect_joins_dirs_and_names_missing_groups(tmp_path, capsys):
    first, second, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    first.mkdir()
    second.mkdir()
    prefill_file(first / "prefill.json")
    write(first / "decode.json", decode_data())
    write(second / "ffn.json", ffn_data(teal=False))
    write(second / "bsr.json", bsr_data())
    write(first / "bsr.json", {"rows": []})   # the later dir holds the group: this older file is not read
    assert targets.main(["--collect", str(first), str(second), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("| semi |") and printed[-1].endswith("**not run** |")   # the table comes last
    saved = load(out / "targets.json")
    groups = {r["group"]: r["verdict"] for r in saved["rows"] if r["verdict"] == NOT_RUN}
    assert set(groups) == {"dense", "gate", "batch", "semi"}
    assert {r["verdict"] for r in saved["rows"] if r["group"] == "bsr"} == {MET, MISSED, REPORT}
    assert saved["header"]["device"] == "NVIDIA H200 (prefill, ffn); ? (decode, bsr)"   # decode / bsr name none
    assert (out / "targets.md").read_text().count("| prefill |") == 1 + 10   # its group line, its 10 rows


def test_a_failing_group_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    provenance = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "date": "2026-12-06",
                  "source": "abc1234", "autotune": ""}
    options = argparse.Namespace(rounds=5, teal="")

    def crash(argv):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def fails_check(argv):
        sys.exit("correctness check failed: gate M=1 50% torch.float16: rel err 0.5")

    def writes_rows(argv):
        semi_file(argv[argv.index("--json") + 1])

    write(tmp_path / "decode.json", decode_data())   # a stale file of an earlier run: removed before the run
    runs = [targets.run_group(dataclasses.replace(targets.GROUP_BY_NAME[name], run=run), str(tmp_path), options,
                              provenance)
            for name, run in (("decode", crash), ("gate", fails_check), ("semi", writes_rows))]
    assert [r["status"] for r in runs] == [ERROR, ERROR, "done"]
    write(tmp_path / "batch.run.json", dict(provenance, group="batch", status="running"))   # stopped from outside
    data, infos = targets.load_groups([str(tmp_path)])
    assert "decode" not in data and infos["semi"]["seconds"] is not None
    rows = targets.target_rows(data, infos)
    errors = {r.group: r.measured for r in rows if r.verdict == ERROR}
    assert errors["decode"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert errors["gate"].startswith("correctness check failed")
    assert errors["batch"] == "the run did not finish"
    assert [r.verdict for r in rows if r.group == "semi"] == [MET]


def test_unreadable_rows_are_an_error_row_not_a_crash(tmp_path):
    (tmp_path / "gate.json").write_text("{not json")
    write(tmp_path / "decode.json", {"ceilings": {}, "rows": [1, 2]})
    data, infos = targets.load_groups([str(tmp_path)])
    rows = targets.target_rows(data, infos)
    assert [r.verdict for r in rows if r.group == "gate"] == [ERROR]
    assert [r.verdict for r in rows if r.group == "decode"] == [ERROR]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_running_groups_without_cuda_says_so_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as exc:
        targets.main(["--groups", "semi", "--out", str(tmp_path)])
    assert "needs a CUDA device" in str(exc.value.code) and "\n" not in str(exc.value.code)
    assert not os.listdir(tmp_path)


def test_dry_run_lists_each_group_with_its_bench_arguments(tmp_path, capsys):
    assert targets.main(["--dry-run", "--out", str(tmp_path), "--teal", "teal.py", "--rounds", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == [g.name for g in targets.GROUPS]
    prefill = lines[0]
    assert "bench/prefill_hopper.py" in prefill and "--rounds 3" in prefill and "--variants pp3p" in prefill
    assert f"--json {tmp_path}/prefill.json" in prefill
    assert "--teal teal.py" in lines[3] and "--teal ''" in lines[5]
    with pytest.raises(SystemExit):
        targets.main(["--dry-run", "--groups", "prefill,nope"])
