"""MInference's published Llama-3-8B-262K pattern through sparsecc on a Llama-3-8B-shape model (CUDA).

The pattern file's first two layers (tests/data/importers/minference_configs/, from microsoft/MInference at
fb56c91) are imported with ``sparsecc.importers.import_minference``. Each layer's heads have their own
vertical/slash budgets, so each attention site is one ``mixed_head_attention`` call.

Per layer, at each prefill length (B=1, H=32, Hkv=8, D=128, bf16, causal; random and rope-local q/k/v), in one run:
the sparsecc op (scores, selection, index and attention, as each call runs them), dense SDPA, and
FlexAttention fed the same per-head layout at its 128x128 block granularity (the blocks holding a kept pair,
causal inside) -- plus the kept density of each. MInference's own selection keeps exactly sparsecc's pairs
(``vertical_slash`` is its rule; tests/test_vertical_slash_parity.py checks the pair sets against an
independent implementation), so its density is sparsecc's. Then the whole 2-layer model (hidden 4096, FFN
14336): eager SDPA, Inductor (``torch.compile``) and sparsecc, forward of the base model.

    python bench/minference.py [--seqs 65536 131072] [--no-model] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402 - bench/ is on the path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.attention import bench, qkv, sdpa  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "importers",
                      "minference_configs", "Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json")
FLEX_BLOCK = 128
DEVICE = "cuda"


def head_table(spec, layer: int, heads: int):
    from sparsecc.codegen.mixed_attention import HeadTable

    path = f"model.layers.{layer}.self_attn"
    return HeadTable.of([getattr(spec.resolve("attention", path, head=h), "form", None) for h in range(heads)])


def vs_index(q, k, table, scale):
    """The index the mixed op builds (``vertical_slash_family`` calls the same function)."""
    from sparsecc.codegen.mixed_attention import vertical_slash_table_index

    return vertical_slash_table_index(q, k, table, scale)


def kept_pairs_and_blocks(index, flex_block: int = FLEX_BLOCK):
    """(exact kept pairs, causal pairs, Flex's 128-block keep ``[1, H, nQ, nK]``) of a vertical_slash index."""
    b, h, n_lanes, n_s = index.range_start.shape
    sq, sk, block = index.seq_q, index.seq_k, index.block
    dev = index.range_start.device
    n_kb = -(-sk // flex_block)
    lanes_per_fb = flex_block // block
    keep = torch.zeros(b, h, -(-n_lanes // lanes_per_fb), n_kb, dtype=torch.bool, device=dev)
    kept = 0
    step = 64
    for a0 in range(0, n_lanes, step):
        a1 = min(n_lanes, a0 + step)
        rs = index.range_start[:, :, a0:a1].long()
        re = index.range_end[:, :, a0:a1].long().clamp(max=sk)
        valid = torch.arange(n_s, device=dev) < index.range_count[:, :, a0:a1, None]
        rows = torch.arange(a0 * block, a1 * block, device=dev).view(a1 - a0, block)     # [lanes, block]
        pos = (rows + sk - sq)[None, None, :, :, None]                                   # [1,1,L,block,1]
        row_ok = (rows < sq)[None, None, :, :, None]
        span = (torch.minimum(re[..., None, :], pos + 1) - rs[..., None, :]).clamp(min=0)
        kept += int((span * (valid[..., None, :] & row_ok)).sum())
        cols = index.col_index[:, :, a0:a1].long()
        cvalid = torch.arange(cols.shape[-1], device=dev) < index.col_count[:, :, a0:a1, None]
        kept += int(((cols[..., None, :] <= pos) & cvalid[..., None, :] & row_ok).sum())
        # Flex blocks: every 128-block a range or a column touches, for the 128-row block holding the lane.
        diff = torch.zeros(b, h, a1 - a0, n_kb + 1, dtype=torch.int32, device=dev)
        one = valid.to(torch.int32)
        diff.scatter_add_(-1, torch.where(valid, rs // flex_block, n_kb), one)
        diff.scatter_add_(-1, torch.where(valid, (re - 1).clamp(min=0) // flex_block + 1, n_kb), -one)
        lane_keep = diff.cumsum(-1)[..., :n_kb] > 0
        hit = torch.zeros(b, h, a1 - a0, n_kb + 1, dtype=torch.bool, device=dev)
        hit.scatter_(-1, torch.where(cvalid, cols // flex_block, n_kb), True)
        lane_keep |= hit[..., :n_kb]
        pad = (-(a1 - a0)) % lanes_per_fb
        lane_keep = torch.nn.functional.pad(lane_keep, (0, 0, 0, pad))
        grouped = lane_keep.view(b, h, -1, lanes_per_fb, n_kb).any(3)
        f0 = a0 // lanes_per_fb
        keep[:, :, f0:f0 + grouped.shape[2]] |= grouped
    causal_pairs = sq * (sk - sq) + sq * (sq + 1) // 2
    return kept, causal_pairs * b * h, keep


def flex_from_keep(keep, sq, sk):
    from torch.nn.attention.flex_attention import BlockMask

    n_q, n_k = keep.shape[-2:]
    allowed = (torch.arange(n_k, device=keep.device)[None, :] * FLEX_BLOCK
               <= torch.arange(n_q, device=keep.device)[:, None] * FLEX_BLOCK + FLEX_BLOCK - 1 + (sk - sq))
    keep = keep & allowed
    num = keep.sum(-1).to(torch.int32)
    idx = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    offset = sk - sq

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=causal, seq_lengths=(sq, sk))
    flex_pairs = 0
    for qb in range(n_q):      # kept block pairs times their causal elements
        rows = torch.arange(qb * FLEX_BLOCK, min(sq, qb * FLEX_BLOCK + FLEX_BLOCK), device=keep.device) + offset
        kb = keep[..., qb, :]
        starts = torch.arange(n_k, device=keep.device) * FLEX_BLOCK
        width = (sk - starts).clamp(max=FLEX_BLOCK)           # keys the block has
        per_block = torch.minimum(rows[:, None] - starts[None, :] + 1, width[None, :]).clamp(min=0).sum(0)
        flex_pairs += int((kb * per_block).sum())
    return mask, flex_pairs


def rope_local_qkv(s: int, seed: int = 0):
    """q/k/v whose attention is local plus a few sink keys, as trained decoders' often is: each head's q and k
    are one content vector rotated by RoPE (Llama-3's base 500000) plus noise, so q_i . k_j falls off with
    i - j; the first four keys carry a direction every query shares."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    d, h, hkv = 128, 32, 8
    inv = 500000.0 ** (-torch.arange(0, d, 2, device=DEVICE, dtype=torch.float32) / d)
    ang = torch.arange(s, device=DEVICE, dtype=torch.float32)[:, None] * inv[None, :]     # [S, D/2]
    cos, sin = ang.cos(), ang.sin()

    def rotate(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)

    content = torch.randn(hkv, 1, d, device=DEVICE, generator=g)
    k = rotate(content.expand(hkv, s, d)) + 0.5 * torch.randn(hkv, s, d, device=DEVICE, generator=g)
    q = rotate(content.repeat_interleave(h // hkv, 0).expand(h, s, d)) * 1.5
    q = q + 0.5 * torch.randn(h, s, d, device=DEVICE, generator=g)
    k[:, :4] += 3.0 * content
    v = torch.randn(hkv, s, d, device=DEVICE, generator=g)
    return tuple(t[None].to(torch.bfloat16).contiguous() for t in (q, k, v))


def sweep(seqs, log):
    """Time the vertical_slash attention kernel's launch settings on layer 0's index (the default is LAUNCH)."""
    from sparsecc.codegen import vertical_slash_kernels as vk
    from sparsecc.importers import import_minference

    spec = import_minference(CONFIG, policy="force")
    for s in seqs:
        q, k, v = rope_local_qkv(s)
        table = head_table(spec, 0, 32)
        index = vs_index(q, k, table, 1 / math.sqrt(128))
        for warps in (4, 8):
            for stages in (1, 2, 3):
                cfg = {"num_warps": warps, "num_stages": stages}
                t = bench(lambda: vk.vertical_slash_attention_kernel(q, k, v, index, 1 / math.sqrt(128), launch=cfg))
                log(f"sweep {s // 1024}K warps={warps} stages={stages}: {t:.3f} ms")


def op_rows(spec, seqs, log):
    from bench.attention import flex_call
    from sparsecc.codegen import ops

    rows = []
    for s, inputs in ((s, kind) for s in seqs for kind in ("random", "rope-local")):
        q, k, v = qkv(1, 32, 8, s, s, 128) if inputs == "random" else rope_local_qkv(s)
        scale = 1 / math.sqrt(128)
        t_sdpa = bench(lambda: sdpa(q, k, v, True))
        for layer in (0, 1):
            table = head_table(spec, layer, 32)
            args = (*table.op_args(), 0, "auto")
            out = ops.mixed_head_attention(q, k, v, None, scale, True, *args)
            assert torch.isfinite(out).all()
            t_sc = bench(lambda: ops.mixed_head_attention(q, k, v, None, scale, True, *args))
            index = vs_index(q, k, table, scale)
            t_index = bench(lambda: vs_index(q, k, table, scale))
            kept, causal_pairs, keep = kept_pairs_and_blocks(index)
            mask, flex_pairs = flex_from_keep(keep, s, s)
            t_flex = bench(lambda: flex_call(q, k, v, mask))
            row = dict(workload=f"layer {layer}, {s // 1024}K, {inputs} q/k", sc=t_sc, index=t_index, sdpa=t_sdpa, flex=t_flex,
                       density=kept / causal_pairs, flex_density=flex_pairs / causal_pairs)
            log(f"{row['workload']}: sparsecc {t_sc:.3f} ms (selection+index {t_index:.3f}), SDPA {t_sdpa:.3f}, "
                f"Flex {t_flex:.3f}; density {row['density']:.4f}, Flex-block density {row['flex_density']:.4f}")
            rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def model_rows(seqs, log, budget_s):
    import transformers

    import sparsecc
    from sparsecc.importers import import_minference

    spec = import_minference(CONFIG, policy="force", modules_template="layers.{layer}.self_attn")

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=262144,
                                   rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaModel(cfg).to("cuda", torch.bfloat16).eval()
    rows, start = [], time.time()
    for s in seqs:
        if time.time() - start > budget_s:
            log(f"model {s // 1024}K: skipped (time budget)")
            continue
        ids = torch.randint(0, 32000, (1, s), device=DEVICE)
        with torch.no_grad():
            torch._dynamo.reset()
            inductor = torch.compile(model, dynamic=False)
            t_eager = bench(lambda: model(ids))
            t_ind = bench(lambda: inductor(ids))
            torch._dynamo.reset()
            sc = torch.compile(model, backend="sparsecc", dynamic=False, options={"spec": spec})
            sc(ids)
            report = sparsecc.last_report()
            applied = sum(1 for x in report.sites if x.kind == "attention" and x.applied)
            t_sc = bench(lambda: sc(ids))
        rows.append(dict(workload=f"2-layer model, {s // 1024}K", eager=t_eager, inductor=t_ind, sc=t_sc,
                         applied=applied))
        log(f"model {s // 1024}K: eager {t_eager:.2f} ms, Inductor {t_ind:.2f}, sparsecc {t_sc:.2f} "
            f"({applied}/2 attention sites applied)")
    return rows


def write(path, op, model, header):
    lines = ["", "## MInference Llama-3-8B-262K pattern (bench/minference.py)", "", *header, "",
             "| workload | sparsecc ms | of which selection + index | SDPA ms | Flex ms | x SDPA | x Flex | "
             "kept density (sparsecc = MInference) | Flex-block density |", "|---|---|---|---|---|---|---|---|---|"]
    for r in op:
        lines.append(f"| {r['workload']} | {r['sc']:.3f} | {r['index']:.3f} | {r['sdpa']:.3f} | {r['flex']:.3f} | "
                     f"{r['sdpa'] / r['sc']:.2f} | {r['flex'] / r['sc']:.2f} | {r['density']:.4f} | "
                     f"{r['flex_density']:.4f} |")
    if model:
        lines += ["", "| workload | eager ms | Inductor ms | sparsecc ms | x eager | x Inductor | sites applied |",
                  "|---|---|---|---|---|---|---|"]
        for r in model:
            lines.append(f"| {r['workload']} | {r['eager']:.2f} | {r['inductor']:.2f} | {r['sc']:.2f} | "
                         f"{r['eager'] / r['sc']:.2f} | {r['inductor'] / r['sc']:.2f} | {r['applied']}/2 |")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--no-model", action="store_true", help="skip the whole-model rows")
    ap.add_argument("--sweep", action="store_true", help="also time the attention kernel's launch settings")
    ap.add_argument("--model-budget", type=float, default=300.0, help="seconds after which model rows are skipped")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    args = ap.parse_args(argv)
    from sparsecc.importers import import_minference

    spec = import_minference(CONFIG, policy="force")
    log = lambda m: print(m, flush=True)  # noqa: E731
    op = op_rows(spec, args.seqs, log)
    if args.sweep:
        sweep(args.seqs, log)
    model = [] if args.no_model else model_rows(args.seqs, log, args.model_budget)
    commit = source_version()
    import triton

    header = [f"- device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}",
              f"- date: {datetime.date.today()}, commit {commit or 'unknown'}",
              "- B=1, H=32, Hkv=8, D=128, bf16, causal; q/k/v seeded random, or rope-local (RoPE-rotated shared "
              "content per head plus noise and four sink keys: local attention); layers 0 and 1 of the pattern file; "
              "medians of do_bench; densities are kept (query, key) pairs over causal pairs"]
    write(args.results, op, model, header)


if __name__ == "__main__":
    main()
