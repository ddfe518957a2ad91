"""The FFN and linear ops: ``torch.ops.sparsecc.{threshold_linear, threshold_ffn, gate_sparse_ffn,
semi_structured_linear, block_sparse_linear}``.

Each op is one :class:`~sparsecc.codegen.op_record.OpRecord` at the end of this file, with its typed
arguments (the ``*Args`` dataclasses) and its body (the functions below, which pick the kernel or the
reference). The activation-sparse decode ops (``threshold_linear``, ``threshold_ffn``, ``gate_sparse_ffn``) are traced
into Inductor's graph on CUDA; the weight-sparse linears bind per-weight state on the host on their
first call and stay opaque ops (see each record's reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sparsecc.codegen.op_record import OpRecord, TensorInput, no_kernel_reason, pick

__all__ = ["ThresholdLinearArgs", "ThresholdFfnArgs", "GateSparseFfnArgs", "SemiStructuredLinearArgs",
           "BlockSparseLinearArgs", "THRESHOLD_LINEAR", "THRESHOLD_FFN", "GATE_SPARSE_FFN", "SEMI_STRUCTURED_LINEAR",
           "BLOCK_SPARSE_LINEAR", "LINEAR_RECORDS", "threshold_linear", "threshold_ffn", "gate_sparse_ffn",
           "semi_structured_linear", "block_sparse_linear"]


@dataclass(frozen=True)
class ThresholdLinearArgs:
    """Arguments of ``threshold_linear``: the threshold ``tau`` and ``impl`` (auto, triton, reference)."""

    tau: float
    impl: str = "auto"


@dataclass(frozen=True)
class ThresholdFfnArgs:
    """Arguments of ``threshold_ffn``: the activation's name, the thresholds on x and on h, and ``impl``."""

    act: str
    tau_input: float
    tau_down: float
    impl: str = "auto"


@dataclass(frozen=True)
class GateSparseFfnArgs:
    """Arguments of ``gate_sparse_ffn``: the activation's name, the threshold on act(gate) and ``impl``."""

    act: str
    tau: float
    impl: str = "auto"


@dataclass(frozen=True)
class SemiStructuredLinearArgs:
    """Arguments of ``semi_structured_linear``: the dense weight's shape, ``impl``, and cuSPARSELt's settings
    planned at compile time (``alg_id`` -1: none planned, searched on the first call of a token bucket)."""

    out_features: int
    in_features: int
    impl: str = "auto"
    alg_id: int = -1
    split_k: int = 1
    split_k_mode: int = -1


@dataclass(frozen=True)
class BlockSparseLinearArgs:
    """Arguments of ``block_sparse_linear``: the dense weight's shape, ``impl`` and the fused epilogue
    (an ``EpilogueChain`` string, ``""`` for none)."""

    out_features: int
    in_features: int
    impl: str = "auto"
    epilogue: str = ""


def threshold_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tau: float,
                     impl: str = "auto", channel_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x * (|x| > tau), weight, bias)``: input activation sparsity (TEAL).

    ``channel_scale`` (criterion "weighted") keeps channel i iff ``|x_i| * channel_scale[i] > tau``.
    """
    return pick(THRESHOLD_LINEAR, impl, x.device, _threshold_linear_reference)(
        x, weight, bias, tau, channel_scale=channel_scale)


def threshold_ffn(x: torch.Tensor, w_gate: torch.Tensor, b_gate: Optional[torch.Tensor], w_up: torch.Tensor,
                  b_up: Optional[torch.Tensor], w_down: torch.Tensor, b_down: Optional[torch.Tensor], act: str,
                  tau_input: float, tau_down: float, impl: str = "auto", scale_gate: Optional[torch.Tensor] = None,
                  scale_up: Optional[torch.Tensor] = None, scale_down: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gated FFN whose three projections read thresholded inputs (TEAL input mode), as one op.

    ``scale_gate`` / ``scale_up`` / ``scale_down`` (criterion "weighted") are the column norms each projection
    multiplies its input's magnitudes by before comparing with its threshold.
    """
    return pick(THRESHOLD_FFN, impl, x.device, _threshold_ffn_reference)(
        x, w_gate, b_gate, w_up, b_up, w_down, b_down, act, tau_input, tau_down, scale_gate=scale_gate,
        scale_up=scale_up, scale_down=scale_down)


def gate_sparse_ffn(x: torch.Tensor, w_gate: torch.Tensor, b_gate: Optional[torch.Tensor],
                    w_up: Optional[torch.Tensor], b_up: Optional[torch.Tensor], w_down: torch.Tensor,
                    b_down: Optional[torch.Tensor], act: str, tau: float, impl: str = "auto") -> torch.Tensor:
    """FFN with thresholded gate activations (CATS); ``w_up`` None for a plain FFN."""
    from sparsecc.codegen.gate_sparse_ffn import gate_sparse_ffn_ref

    def reference(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act, tau):
        return gate_sparse_ffn_ref(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act=act, tau=tau)

    fn = pick(GATE_SPARSE_FFN, impl, x.device, reference)
    return fn(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act, tau)


def semi_structured_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                           bias: Optional[torch.Tensor], out_features: int, in_features: int,
                           impl: str = "auto", packed: Optional[torch.Tensor] = None, alg_id: int = -1,
                           split_k: int = 1, split_k_mode: int = -1) -> torch.Tensor:
    """``x @ Wᵀ + b`` with W stored 2:4-compressed (values + 2-bit positions).

    ``packed`` is the same weight as cuSPARSELt's compressed operand (``torch._cslt_compress`` of the pruned
    weight), bound at compile time where cuSPARSELt takes the weight; the kernel then runs it as it is instead of
    compressing on its first call, which keeps the call capturable in a CUDA graph. ``alg_id`` / ``split_k`` /
    ``split_k_mode`` are cuSPARSELt's settings planned for this call's token count (``alg_id`` -1: searched on
    the first call). The reference ignores both.
    """
    from sparsecc.codegen.semi_structured_linear import config_of, semi_structured_linear_ref
    from sparsecc.weights import SemiStructuredWeight

    if alg_id >= 0 and packed is None:
        raise ValueError(f"sparsecc op semi_structured_linear: alg_id={alg_id} (planned cuSPARSELt settings) needs "
                         "the bound operand `packed`; pass alg_id=-1 to search on the first call")

    def reference(x, values, indices, bias, packed, config=None):
        weight = SemiStructuredWeight(values=values, indices=indices, shape=(out_features, in_features))
        return semi_structured_linear_ref(x, weight, bias)

    return pick(SEMI_STRUCTURED_LINEAR, impl, x.device, reference)(
        x, values, indices, bias, packed, config=config_of(alg_id, split_k, split_k_mode))


def block_sparse_linear(x: torch.Tensor, blocks: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                        bias: Optional[torch.Tensor], out_features: int, in_features: int,
                        impl: str = "auto", epilogue: str = "", gate: Optional[torch.Tensor] = None,
                        residual: Optional[torch.Tensor] = None, up_blocks: Optional[torch.Tensor] = None,
                        up_row_ptr: Optional[torch.Tensor] = None,
                        up_col_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``chain(x @ Wᵀ + b)`` with W stored as kept (bm x bk) blocks in BSR order.

    ``epilogue`` is an ``EpilogueChain`` string (codegen/epilogue.py: bias,
    activation, ``mul:gate``, ``add:residual``, ``mul:up``, cast) whose extra
    inputs are ``gate`` / ``residual`` (the output's shape) and the up
    projection's blocks (fused gate/up).
    """
    from sparsecc.codegen.block_sparse_linear import block_sparse_linear_op_ref

    fn = pick(BLOCK_SPARSE_LINEAR, impl, x.device, block_sparse_linear_op_ref)
    return fn(x, blocks, row_ptr, col_idx, bias, epilogue, gate, residual, up_blocks, up_row_ptr, up_col_idx)



# ---------------------------------------------------------------- records

def _linear_fake(x, values, indices, bias, out_features, *args):
    return x.new_empty((*x.shape[:-1], out_features))


def _block_sparse_linear_fake(x, blocks, row_ptr, col_idx, bias, out_features, in_features, impl="auto",
                              epilogue="", gate=None, residual=None, up_blocks=None, up_row_ptr=None,
                              up_col_idx=None):
    from sparsecc.codegen.epilogue import EpilogueChain
    return x.new_empty((*x.shape[:-1], out_features), dtype=EpilogueChain.parse(epilogue).out_dtype(x.dtype))


def _threshold_linear_fake(x, weight, bias, tau, impl="auto", channel_scale=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _ffn_fake(x, w_gate, b_gate, w_up, b_up, w_down, *args):
    return x.new_empty((*x.shape[:-1], w_down.shape[0]))


def _threshold_linear_reference(x, weight, bias, tau, impl="reference", channel_scale=None):
    from sparsecc.codegen.activation_sparse import threshold_linear_ref
    return threshold_linear_ref(x, weight, bias, tau, channel_scale)


def _threshold_ffn_reference(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act, tau_input, tau_down,
                             impl="reference", scale_gate=None, scale_up=None, scale_down=None):
    from sparsecc.codegen.threshold_ffn import threshold_ffn_ref
    return threshold_ffn_ref(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act=act, tau_input=tau_input,
                             tau_down=tau_down, scale_gate=scale_gate, scale_up=scale_up, scale_down=scale_down)


def _gate_sparse_ffn_reference(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act, tau, impl="reference"):
    from sparsecc.codegen.gate_sparse_ffn import gate_sparse_ffn_ref
    return gate_sparse_ffn_ref(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act=act, tau=tau)


def _semi_structured_reference(x, values, indices, bias, out_features, in_features, impl="reference", packed=None,
                               alg_id=-1, split_k=1, split_k_mode=-1):
    return semi_structured_linear(x, values, indices, bias, out_features, in_features, "reference")


def _block_sparse_linear_reference(x, blocks, row_ptr, col_idx, bias, out_features, in_features, impl="reference",
                                   epilogue="", gate=None, residual=None, up_blocks=None, up_row_ptr=None,
                                   up_col_idx=None):
    from sparsecc.codegen.block_sparse_linear import block_sparse_linear_op_ref
    return block_sparse_linear_op_ref(x, blocks, row_ptr, col_idx, bias, epilogue, gate, residual, up_blocks,
                                      up_row_ptr, up_col_idx)


def _threshold_linear_opaque(args: ThresholdLinearArgs, device: torch.device, symbolic: bool) -> Optional[str]:
    return no_kernel_reason(THRESHOLD_LINEAR, args.impl, device)


def _threshold_ffn_opaque(args: ThresholdFfnArgs, device: torch.device, symbolic: bool) -> Optional[str]:
    return no_kernel_reason(THRESHOLD_FFN, args.impl, device)


def _gate_sparse_ffn_opaque(args: GateSparseFfnArgs, device: torch.device, symbolic: bool) -> Optional[str]:
    return no_kernel_reason(GATE_SPARSE_FFN, args.impl, device)


THRESHOLD_LINEAR = OpRecord(
    name="threshold_linear",
    tensors=(TensorInput("x"), TensorInput("weight"), TensorInput("bias", optional=True),
             TensorInput("channel_scale", optional=True)),
    args=ThresholdLinearArgs, order=("x", "weight", "bias", "tau", "impl", "channel_scale"),
    body=threshold_linear, reference=_threshold_linear_reference, fake=_threshold_linear_fake,
    kernel="sparsecc.codegen.activation_sparse:threshold_linear",
    opaque_reason=_threshold_linear_opaque,
    doc="F.linear(x * (|x| > tau), weight, bias): input activation sparsity (TEAL).")

THRESHOLD_FFN = OpRecord(
    name="threshold_ffn",
    tensors=(TensorInput("x"), TensorInput("w_gate"), TensorInput("b_gate", optional=True), TensorInput("w_up"),
             TensorInput("b_up", optional=True), TensorInput("w_down"), TensorInput("b_down", optional=True),
             TensorInput("scale_gate", optional=True), TensorInput("scale_up", optional=True),
             TensorInput("scale_down", optional=True)),
    args=ThresholdFfnArgs,
    order=("x", "w_gate", "b_gate", "w_up", "b_up", "w_down", "b_down", "act", "tau_input", "tau_down", "impl",
           "scale_gate", "scale_up", "scale_down"),
    body=threshold_ffn, reference=_threshold_ffn_reference, fake=_ffn_fake,
    kernel="sparsecc.codegen.threshold_ffn:threshold_ffn",
    opaque_reason=_threshold_ffn_opaque,
    doc="act(x~ Wg^T + bg) * (x~ Wu^T + bu), thresholded again, times Wd^T + bd: a gated FFN in TEAL input mode.")

GATE_SPARSE_FFN = OpRecord(
    name="gate_sparse_ffn",
    tensors=(TensorInput("x"), TensorInput("w_gate"), TensorInput("b_gate", optional=True),
             TensorInput("w_up", optional=True), TensorInput("b_up", optional=True), TensorInput("w_down"),
             TensorInput("b_down", optional=True)),
    args=GateSparseFfnArgs,
    body=gate_sparse_ffn, reference=_gate_sparse_ffn_reference, fake=_ffn_fake,
    kernel="sparsecc.codegen.gate_sparse_ffn:gate_sparse_ffn",
    opaque_reason=_gate_sparse_ffn_opaque,
    doc="FFN with thresholded gate activations (CATS).")

SEMI_STRUCTURED_LINEAR = OpRecord(
    name="semi_structured_linear",
    tensors=(TensorInput("x"), TensorInput("values"), TensorInput("indices"), TensorInput("bias", optional=True),
             TensorInput("packed", optional=True)),
    args=SemiStructuredLinearArgs,
    order=("x", "values", "indices", "bias", "out_features", "in_features", "impl", "packed", "alg_id", "split_k",
           "split_k_mode"),
    body=semi_structured_linear, reference=_semi_structured_reference, fake=_linear_fake,
    kernel="sparsecc.codegen.semi_structured_linear:semi_structured_linear",
    always_opaque="calls cuSPARSELt through plans kept on the host (made on the first call of a shape, then one "
                  "library call per product), which Inductor's generated code cannot launch; without settings planned "
                  "at compile time it also searches them on its first call of a token bucket (and, without a bound "
                  "operand, compresses the weight there)",
    doc="x @ W^T + b with W stored 2:4-compressed.")

BLOCK_SPARSE_LINEAR = OpRecord(
    name="block_sparse_linear",
    tensors=(TensorInput("x"), TensorInput("blocks"), TensorInput("row_ptr"), TensorInput("col_idx"),
             TensorInput("bias", optional=True), TensorInput("gate", optional=True),
             TensorInput("residual", optional=True), TensorInput("up_blocks", optional=True),
             TensorInput("up_row_ptr", optional=True), TensorInput("up_col_idx", optional=True)),
    args=BlockSparseLinearArgs,
    order=("x", "blocks", "row_ptr", "col_idx", "bias", "out_features", "in_features", "impl", "epilogue", "gate",
           "residual", "up_blocks", "up_row_ptr", "up_col_idx"),
    body=block_sparse_linear, reference=_block_sparse_linear_reference, fake=_block_sparse_linear_fake,
    kernel="sparsecc.codegen.block_sparse_linear:block_sparse_linear_op",
    always_opaque="keeps a per-weight row order on the host and generates its epilogue function per chain",
    doc="chain(x @ W^T + b) with W stored as kept blocks in BSR order.")

LINEAR_RECORDS = (THRESHOLD_LINEAR, THRESHOLD_FFN, GATE_SPARSE_FFN, SEMI_STRUCTURED_LINEAR, BLOCK_SPARSE_LINEAR)
