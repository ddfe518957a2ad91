"""Streaming heads of two windows on one site: the streaming op's one launch with a rule per head against the mixed
op's run group by group (what such a site ran before it became one streaming op), with all heads at the wide
window and SDPA's dense causal attention beside them. B=1, H=32, Hkv=8, D=128, bf16; half the KV heads' query
heads stream (128, 4096), the other half (128, 1024). On CPU it runs a tiny shape once, untimed.

    python bench/streaming_mix.py
"""
import sys
import torch
import torch.nn.functional as F
from sparsecc.codegen import attention_ops
from sparsecc.codegen.mixed_attention import HeadTable
from sparsecc.forms import Streaming

cuda = torch.cuda.is_available()
dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
B, H, HKV, D = (1, 32, 8, 128) if cuda else (1, 4, 2, 16)
lengths = (16384, 32768, 65536) if cuda else (64,)
SINK, WIDE, NARROW = (128, 4096, 1024) if cuda else (2, 16, 4)


def bench(fn):
    if not cuda:
        fn()
        return float("nan")
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


print(torch.cuda.get_device_name() if cuda else "cpu", torch.__version__)
for S in lengths:
    torch.manual_seed(0)
    q = torch.randn(B, H, S, D, device=dev, dtype=dt)
    k = torch.randn(B, HKV, S, D, device=dev, dtype=dt)
    v = torch.randn(B, HKV, S, D, device=dev, dtype=dt)
    g = H // HKV
    forms = [Streaming(SINK, WIDE) if h // g < HKV // 2 else Streaming(SINK, NARROW) for h in range(H)]
    sinks, windows = [f.sink for f in forms], [f.window for f in forms]
    scale = D ** -0.5
    table = HeadTable.of(forms)
    one = lambda: attention_ops.streaming_attention(q, k, v, None, scale, True, sinks, windows, 0, "auto")
    mixed = lambda: attention_ops.mixed_head_attention(q, k, v, None, scale, True, *table.op_args(), 0, "auto")
    wide = lambda: attention_ops.streaming_attention(q, k, v, None, scale, True, [SINK] * H, [WIDE] * H, 0, "auto")
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    a, b = one(), mixed()
    err = (a.float() - b.float()).abs().max().item()
    t = {name: bench(fn) for name, fn in (("one", one), ("mixed", mixed), ("wide", wide), ("sdpa", sdpa))}
    print(f"S={S}: max|one - mixed| {err:.2e}; ms one-launch {t['one']:.3f} mixed {t['mixed']:.3f} "
          f"all-wide {t['wide']:.3f} sdpa {t['sdpa']:.3f}; one launch {t['mixed'] / t['one']:.2f}x the mixed op",
          flush=True)
