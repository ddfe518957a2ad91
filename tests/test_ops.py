"""The custom ops: schemas, fake implementations and real outputs agree (torch.library.opcheck)."""

import torch

from sparsecc.codegen import ops
from sparsecc.weights import compress_2to4, compress_block_weights
from sparsecc.forms import BlockWeights


def _check(name, *args):
    torch.library.opcheck(ops.op(name), args, test_utils=("test_schema", "test_faketensor"))


def test_attention_ops():
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    _check("streaming_attention", q, k, v, None, 0.3, True, [1, 1, 1, 0], [3, 3, 3, -1], 0, "reference")
    _check("streaming_attention", q, k, v, None, 0.3, True, [1] * 4, [3] * 4, 100, "reference")
    _check("block_sparse_attention", q, k, v, None, 0.3, False, 4, 1, 1, 0, 0, [2], 0, "reference")


def test_linear_and_ffn_ops():
    x, w = torch.randn(3, 5, 16), torch.randn(32, 16)
    _check("threshold_linear", x, w, torch.randn(32), 0.2, "reference")
    c = compress_2to4(w)
    _check("semi_structured_linear", x, c.values, c.indices, None, 32, 16, "reference")
    b = compress_block_weights(w, BlockWeights((16, 16), 0.5))
    _check("block_sparse_linear", x, b.blocks, b.row_ptr, b.col_idx, None, 32, 16, "reference")
    wg, wu, wd = torch.randn(24, 16), torch.randn(24, 16), torch.randn(16, 24)
    _check("gate_sparse_ffn", x, wg, None, wu, None, wd, None, "silu", 0.1, "reference")
