"""The Gluon kernels compile for sm_90 with the installed Triton, on a machine without a GPU.

Gluon has no interpreter path, so the CPU suite cannot run codegen/streaming_prefill_hopper.py; it can still
compile it. Triton's compiler and its bundled ptxas need no GPU once the target is given, so a child process
installs a driver stub that reports sm_90 and asks each program for its cubin. This keeps the kernels valid on
the newest Triton (the GPU machine has triton 3.6, CI installs the newest: Gluon's API moves between them) and
checks what the source alone decides: asynchronous warpgroup MMAs, register reallocation in the warp-specialised
programs, shared memory within sm_90's 227 KiB per block. Numbers are checked on the GPU
(tests/codegen/test_streaming_prefill_hopper.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# sm_90's largest shared-memory allocation per block (227 KiB).
SM90_MAX_SHARED = 232448

_CHILD = textwrap.dedent('''
    import json, sys
    import torch
    from tests import sm90
    sm90.install()
    from sparsecc.codegen import streaming_prefill_hopper as sp

    D, S = 128, 1024
    q = torch.empty(1, 4, S, D, dtype=torch.bfloat16)
    kv = torch.empty(1, 2, S, D, dtype=torch.bfloat16)
    out = {}
    blocks = torch.zeros(32, 12, dtype=torch.int32)   # a block table's program rows
    rules = torch.zeros(4, dtype=torch.int32)        # per-head sinks / windows
    common = dict(H=4, GROUP=2, HEAD_DIM=D, BLOCK_M=128, BLOCK_N=128, grid=(1,))
    for table, suffix in ((q, ""), (blocks, "_table"), (q, "_heads")):
        common.update(TABLE=suffix == "_table", PER_HEAD=suffix == "_heads")
        layout = (table, table.shape[-1] if suffix == "_table" else 1, 1, 1, S, S, 128, 4096, rules, rules, 0.1)
        for stages in (2, 3):
            k = sp._streaming_prefill_kernel.warmup(*sp._descriptors(q, kv, kv, 128, 128), q, *layout,
                                                    STAGES=stages, num_warps=8, **common)
            out[f"s{stages}{suffix}"] = dict(ptx=k.asm["ptx"], shared=k.metadata.shared, cubin=len(k.asm["cubin"]))
            for pingpong in (False, True):
                k = sp._streaming_prefill_ws_kernel.warmup(*sp._descriptors(q, kv, kv, 64, 128), q, *layout, 32,
                                                           STAGES=stages, PRODUCER_REGS=24, CONSUMER_REGS=240,
                                                           PINGPONG=pingpong, num_warps=4, **common)
                out[("pp" if pingpong else "ws") + str(stages) + suffix] = dict(
                    ptx=k.asm["ptx"], shared=k.metadata.shared, cubin=len(k.asm["cubin"]))
    print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    pytest.importorskip("triton.backends.nvidia.driver")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)   # the child imports tests.sm90
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, f"sm_90 compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT"):])


@pytest.mark.parametrize("variant", ["s2", "s3", "ws2", "ws3", "pp2", "pp3", "s3_table", "ws3_table", "pp3_table",
                                     "s3_heads", "ws3_heads", "pp3_heads"])
def test_compiles_for_sm90(compiled, variant):
    k = compiled[variant]
    assert k["cubin"] > 0
    assert "wgmma.mma_async" in k["ptx"]           # the MMAs are Hopper's asynchronous warpgroup MMAs
    assert k["shared"] <= SM90_MAX_SHARED


@pytest.mark.parametrize("variant", ["ws2", "ws3", "pp2", "pp3", "ws3_table", "pp3_heads"])
def test_warp_specialised_programs_reallocate_registers(compiled, variant):
    ptx = compiled[variant]["ptx"]
    assert "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx    # the producer gives its registers back
    assert "setmaxnreg.inc" in ptx


def test_pingpong_adds_turns(compiled):
    """The ping-pong programs wait on more mbarriers than the plain warp-specialised ones (the turns)."""
    waits = {v: compiled[v]["ptx"].count("mbarrier.try_wait") for v in ("ws3", "pp3")}
    assert waits["pp3"] > waits["ws3"]
