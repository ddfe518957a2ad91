"""What the GPU's memory system gives a kernel: L2 and HBM read bandwidth and the launch gap in a CUDA graph.

    python bench/memory_probe.py [--probes read,launch,bsr,gather,list] [--json out.json]

What plain Triton loads get from the memory system, beside the block-sparse linear kernel's traffic in the same run
(bench/RESULTS.md compares them):

* **read bandwidth**: every program sums its share of a buffer, ``repeats`` times over, with ``.cg`` loads
  (cached in L2, not in L1). A buffer well inside the L2 (8-32 MB on an H200) measures L2 -> SM bandwidth; 2 GB
  measures HBM. The best of a few grid / warp shapes is reported; bytes read / ``do_bench`` median.
* **launch gap**: a CUDA graph of ``LAUNCHES`` back-to-back launches of a kernel that stores one value; replay
  time / launches.
* **block-sparse linear, L2 traffic**: ``codegen/block_sparse_linear.py`` on x[8192, 4096] -> 14336 with 64 x 64
  blocks at 10% and 50% density (the bench/linear.py workloads), with the bytes its tiles load through L2 (each
  kept block loads its ``BLOCK_M x 64`` slice of x and the 64 x 64 block) over its time, beside cuBLAS.
* **row gathers**: what a thresholded GEMV's weight reads get from HBM. A [4096, 14336] fp16 matrix (a Llama-3-8B
  gate weight stored K-major); the kept rows are 10% or 30% of them, either a sorted random sample (as a survivor
  list is) or the first rows (contiguous); each program reads ``width``-element segments of the kept rows (128 B to
  2 KB: the FFN's stage 1 reads 64 or 128 columns of a row per program) and sums them. Timed in CUDA graphs over
  ``GATHER_COPIES`` copies (beyond the L2), best of two pipelining depths; bytes of kept segments / time.
* **survivor listing**: what one launch of ``LIST_PROGRAMS`` programs costs when each lists the survivors of a
  one-token split (``|x| > tau`` over 2048 or 4096 channels, 10% or 50% kept) and nothing else, with the shipped
  helper (``activation_sparse._list_survivors``: 1024-channel pieces) and with one scan over the split (the listing
  before 66d7dc2), beside a launch that stores one value; CUDA graphs of 30 launches.

Every figure is a median of ``do_bench`` or of graph replays; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from linear import bench_graph, graph_lead_cycles  # noqa: E402 - the repo's graph timing (calls cycle over weight copies)

from sparsecc.codegen import activation_sparse as gemv  # noqa: E402 - the shipped survivor listing

LAUNCHES = 64
L2_SIZES_MB = (8, 16, 32)
HBM_MB = 2048


@triton.jit
def _read_kernel(src, out, per_program, region, repeats, BLOCK: tl.constexpr):
    """Sum ``per_program`` elements starting at this program's offset, ``repeats`` times (``.cg``: L2, not L1)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * per_program
    for r in range(repeats):
        for i in range(0, per_program, BLOCK):
            idx = (start + i + offs) % region
            acc += tl.load(src + idx, cache_modifier=".cg").to(tl.float32)
    tl.store(out + pid * BLOCK + offs, acc)


@triton.jit
def _gather_kernel(src, rows, out, n_rows, rows_per_split, stride, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Sum the ``BLOCK_N``-wide segment (column tile ``program_id(0)``) of the listed rows ``rows[split's share]``,
    ``BLOCK_R`` rows per trip; the row index is loaded in the loop, as a survivor list is."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, n_rows)
    for r in range(lo, hi, BLOCK_R):
        offs_r = r + tl.arange(0, BLOCK_R)
        live = offs_r < hi
        idx = tl.load(rows + offs_r, mask=live, other=0)
        acc += tl.load(src + idx[:, None].to(tl.int64) * stride + offs_n[None, :], mask=live[:, None],
                       other=0.0).to(tl.float32)
    tl.store(out + (split * tl.num_programs(0) + pid_n) * BLOCK_N + tl.arange(0, BLOCK_N), tl.sum(acc, axis=0))


@triton.jit
def _list_shipped_kernel(x, slot, counts, K, tau, ROWS: tl.constexpr):
    """Each program lists the channels of x[:K] with ``|x| > tau`` into its own slot with the shipped one-token
    helper (bound by :func:`bind_listing` first) and stores their count."""
    pid = tl.program_id(0)
    count = gemv._list_survivors(x, 0, 1, 1, K, 0, tau, slot + pid * ROWS, x, x, 1, ROWS, 0, "")
    tl.store(counts + pid, count)


@triton.jit
def _list_one_scan_kernel(x, slot, counts, K, tau, ROWS: tl.constexpr):
    """The same list ranked with one scan over the whole split (one token's listing before 66d7dc2)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, ROWS)
    keep = (tl.abs(tl.load(x + offs, mask=offs < K, other=0.0).to(tl.float32)) > tau) & (offs < K)
    rank = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(slot + pid * ROWS + rank, offs, mask=keep)
    tl.debug_barrier()
    tl.store(counts + pid, tl.sum(keep.to(tl.int32), axis=0))


@triton.jit
def _tiny_kernel(out):
    tl.store(out, 1.0)


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def per_program_elements(n: int, programs: int, block: int) -> int:
    """Elements each of ``programs`` reads so that together they cover ``n``: a multiple of ``block`` (the last
    programs wrap around to the start, and those elements are counted again, as they are read again)."""
    return -(-(-(-n // programs)) // block) * block


def bytes_read(programs: int, per_program: int, repeats: int, element_size: int) -> int:
    """Bytes one launch of the read kernel loads: every program's elements, ``repeats`` times (wrapped ones too)."""
    return programs * per_program * repeats * element_size


def read_bandwidth(mbytes: float, repeats: int) -> dict:
    """Best TB/s over grid and warp shapes for reading an ``mbytes`` fp16 buffer ``repeats`` times."""
    n = int(mbytes * 2 ** 20) // 2
    src = torch.randn(n, device="cuda", dtype=torch.float16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best = None
    for per_sm in (1, 2, 4, 8):
        for warps in (4, 8):
            block = 1024 * warps // 4
            programs = sms * per_sm
            per_program = per_program_elements(n, programs, block)
            out = torch.empty(programs * block, device="cuda", dtype=torch.float32)

            def run():
                _read_kernel[(programs,)](src, out, per_program, n, repeats, BLOCK=block, num_warps=warps)
            ms = bench_ms(run)
            tbs = bytes_read(programs, per_program, repeats, src.element_size()) / (ms * 1e-3) / 1e12
            if best is None or tbs > best["TB/s"]:
                best = {"MB": mbytes, "repeats": repeats, "programs_per_sm": per_sm, "warps": warps,
                        "ms": ms, "TB/s": tbs}
    return best


def launch_gap() -> dict:
    """us per launch of a one-store Triton kernel, back to back in a CUDA graph (the host's submission of the graph
    hidden behind a lead of GPU work, as ``bench_graph`` does)."""
    out = torch.empty(1, device="cuda")
    _tiny_kernel[(1,)](out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _tiny_kernel[(1,)](out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAUNCHES):
            _tiny_kernel[(1,)](out)
    graph.replay()
    lead = graph_lead_cycles()   # the GPU busy while the host submits each replay, as bench_graph times them
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(lead)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / LAUNCHES)
    return {"launches": LAUNCHES, "us_per_launch": statistics.median(times)}


def bsr_traffic(density: float) -> dict:
    """The block-sparse linear at ``density``: time, cuBLAS time, and the L2 -> SM bytes its tiles load."""
    from sparsecc.codegen.block_sparse_linear import block_sparse_linear
    from sparsecc.forms import BlockWeights
    from sparsecc.kernel_tiles import pick_config
    from sparsecc.weights import compress_block_weights

    m, k, n, blk = 8192, 4096, 14336, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / k ** 0.5
    c = compress_block_weights(w, BlockWeights(block=(blk, blk), density=density))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = x.float() @ c.to_dense().float().T
    out = block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, None)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    if not err < 1e-2:
        raise SystemExit(f"block-sparse linear at {density}: rel err {err:.2e} against the float32 reference")
    kept = int(c.col_idx.numel())
    cfg = pick_config(m, blk, blk, kept / (n // blk))
    m_tiles = -(-m // cfg.BLOCK_M)
    l2_bytes = m_tiles * kept * (cfg.BLOCK_M * blk + blk * blk) * 2
    ms = bench_ms(lambda: block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, None))
    dense_w = c.to_dense()
    dense_ms = bench_ms(lambda: torch.nn.functional.linear(x, dense_w))
    flops = 2.0 * m * kept * blk * blk
    return {"density": density, "kept_blocks": kept, "BLOCK_M": cfg.BLOCK_M, "ms": ms, "dense_ms": dense_ms,
            "x_dense": dense_ms / ms, "kept_TFLOP/s": flops / (ms * 1e-3) / 1e12,
            "dense_TFLOP/s": 2.0 * m * n * k / (dense_ms * 1e-3) / 1e12,
            "L2_TB/s": l2_bytes / (ms * 1e-3) / 1e12, "FLOP_per_L2_byte": flops / l2_bytes, "rel_err": err}


GATHER_SHAPE = (4096, 14336)
GATHER_COPIES = 6
GATHER_WIDTHS = (64, 128, 256, 512, 1024)


def gather_bandwidth(fraction: float, contiguous: bool, width: int, copies, sms: int) -> dict:
    """TB/s of ``_gather_kernel`` reading ``width``-element segments of ``fraction`` of the rows of each copy."""
    k, n = GATHER_SHAPE
    kept = int(round(fraction * k))
    gen = torch.Generator().manual_seed(1)
    rows = (torch.arange(kept) if contiguous else torch.randperm(k, generator=gen)[:kept].sort().values)
    rows = rows.to(torch.int32).cuda()
    block_r = max(8, 8192 // width)               # 16 KB of fp16 per trip
    tiles = n // width
    splits = max(1, -(-2 * sms // tiles))         # about two programs per SM
    per_split = -(-kept // splits)
    out = torch.empty(splits * tiles * width, device="cuda", dtype=torch.float32)
    kept_rows = copies[0][rows.long()].float()
    expected, scale = kept_rows.sum(), kept_rows.abs().sum()   # float32 sums in any order agree within ~1e-6 * scale
    best = None
    for stages in (3, 5):
        def run(src, stages=stages):
            _gather_kernel[(tiles, splits)](src, rows, out, kept, per_split, n, BLOCK_N=width, BLOCK_R=block_r,
                                            num_warps=4, num_stages=stages)
        run(copies[0])
        got = out.sum()
        if not abs(float(got - expected)) <= 1e-5 * float(scale):
            raise SystemExit(f"gather probe: sum {float(got)} against {float(expected)} (width {width})")
        ms = bench_graph([lambda src=src: run(src) for src in copies])
        tbs = kept * n * 2 / (ms * 1e-3) / 1e12
        if best is None or tbs > best["TB/s"]:
            best = {"fraction": fraction, "contiguous": contiguous, "width": width, "bytes_per_segment": width * 2,
                    "programs": tiles * splits, "stages": stages, "us": ms * 1e3, "TB/s": tbs}
    return best


LIST_PROGRAMS = 224   # the one-token FFN's stage-1 grid at Llama-3-8B shapes (14336 / 64 tiles)
LIST_SPLITS = (2048, 4096)


def bind_listing() -> None:
    """JIT the GEMV module's helpers, so that ``_list_shipped_kernel`` calls the compiled ``_list_survivors``."""
    from sparsecc.codegen.epilogue import bind_triton
    bind_triton(vars(gemv), gemv._KERNELS)


def listing_cost(rows: int, kept: float) -> dict:
    """us per launch of each listing kernel over ``rows`` channels keeping ``kept`` of them, and of a launch that
    stores one value (the launch-gap probe's kernel); every list checked against ``torch.nonzero`` first."""
    bind_listing()
    xs = [torch.randn(rows, device="cuda", dtype=torch.float16) for _ in range(3)]
    tau = float(xs[0].float().abs().quantile(1 - kept))
    slot = torch.empty(LIST_PROGRAMS * rows, device="cuda", dtype=torch.int32)
    counts = torch.empty(LIST_PROGRAMS, device="cuda", dtype=torch.int32)
    expected = torch.nonzero(xs[0].float().abs() > tau).flatten().to(torch.int32)
    out = {"channels": rows, "kept": kept}
    for name, kernel in (("pieces", _list_shipped_kernel), ("one_scan", _list_one_scan_kernel)):
        kernel[(LIST_PROGRAMS,)](xs[0], slot, counts, rows, tau, ROWS=rows, num_warps=4)
        got = slot.view(LIST_PROGRAMS, rows)[:, :expected.numel()]
        if not (bool((counts == expected.numel()).all()) and bool((got == expected[None, :]).all())):
            raise SystemExit(f"listing probe: {name} listed other channels than torch.nonzero ({rows} channels)")
        out[f"{name}_us"] = 1e3 * bench_graph([lambda x=x, k=kernel: k[(LIST_PROGRAMS,)](x, slot, counts, rows, tau,
                                                                                          ROWS=rows, num_warps=4)
                                               for x in xs], rounds=10)
    dummy = torch.empty(1, device="cuda")
    out["one_store_us"] = 1e3 * bench_graph([lambda: _tiny_kernel[(LIST_PROGRAMS,)](dummy)] * len(xs), rounds=10)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--probes", default="read,launch,bsr,gather,list", help="which probes to run, comma-separated")
    args = p.parse_args(argv)
    probes = [x for x in args.probes.split(",") if x]
    for x in probes:
        if x not in ("read", "launch", "bsr", "gather", "list"):
            p.error(f"--probes: {x!r} is not allowed; expected read, launch, bsr, gather or list")
    if not torch.cuda.is_available():
        print("memory_probe: needs CUDA; nothing measured")
        return 0
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    if "read" in probes:
        result["read"] = [read_bandwidth(mb, 64) for mb in L2_SIZES_MB] + [read_bandwidth(HBM_MB, 1)]
    if "launch" in probes:
        result["launch"] = launch_gap()
    if "bsr" in probes:
        result["bsr"] = [bsr_traffic(0.1), bsr_traffic(0.5)]
    if "gather" in probes:
        copies = [torch.randn(*GATHER_SHAPE, device="cuda", dtype=torch.float16) for _ in range(GATHER_COPIES)]
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        result["gather"] = [gather_bandwidth(f, c, w, copies, sms) for f in (0.1, 0.3) for c in (False, True)
                            for w in GATHER_WIDTHS]
        del copies
    if "list" in probes:
        result["list"] = [listing_cost(rows, kept) for rows in LIST_SPLITS for kept in (0.1, 0.5)]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}")
    for r in result.get("read", []):
        print(f"read {r['MB']:>6} MB x{r['repeats']:<3}: {r['TB/s']:.2f} TB/s ({r['programs_per_sm']} programs/SM, "
              f"{r['warps']} warps, {r['ms']:.3f} ms)")
    if "launch" in result:
        print(f"graph launch gap: {result['launch']['us_per_launch']:.2f} us per launch")
    for r in result.get("bsr", []):
        print(f"bsr {r['density']:.0%}: {r['ms']:.4f} ms ({r['x_dense']:.2f}x cuBLAS {r['dense_ms']:.4f} ms), kept "
              f"{r['kept_TFLOP/s']:.0f} TFLOP/s (dense {r['dense_TFLOP/s']:.0f}), L2 reads {r['L2_TB/s']:.2f} TB/s at "
              f"{r['FLOP_per_L2_byte']:.0f} FLOP/byte (BLOCK_M {r['BLOCK_M']}, rel err {r['rel_err']:.1e})")
    for r in result.get("gather", []):
        print(f"gather {r['fraction']:.0%} of rows, {'contiguous' if r['contiguous'] else 'random   '}, "
              f"{r['bytes_per_segment']:>4} B segments: {r['TB/s']:.2f} TB/s ({r['us']:.1f} us, {r['programs']} programs, "
              f"{r['stages']} stages)")
    for r in result.get("list", []):
        print(f"list {r['channels']} channels, {r['kept']:.0%} kept, {LIST_PROGRAMS} programs: pieces "
              f"{r['pieces_us']:.2f} us, one scan {r['one_scan_us']:.2f} us, one-store launch {r['one_store_us']:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
