"""Generated epilogues: chain descriptions, the source cache, the debug dump, and kernels with each step.

Chain and cache tests run in this process. Kernel checks on CPU run in a child
process with ``TRITON_INTERPRET=1`` at tiny shapes (Triton fixes interpreter
mode when a function is decorated); ``gpu`` tests run Llama-sized shapes
(4096 -> 14336, M = 8192, 10% density) against a float32 reference with
NaN-poisoned outputs.
"""


import pytest
import torch

from sparsecc.codegen import epilogue as epi
from sparsecc.codegen.epilogue import EpilogueChain, EpilogueStep
from sparsecc.forms import BlockWeights
from sparsecc.weights import compress_block_weights
from tests.interpreter import CHILD, run_interpreter_checks

CUDA = torch.cuda.is_available()
# Relative to the output scale: float32 epilogue, then one rounding to the output dtype.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
POISON = float("nan")

# Every step kind, each activation, and longer chains in the orders the folding pass produces.
CHAINS = ["", "bias", "act:relu", "act:relu2", "act:gelu", "act:gelu_tanh", "act:silu", "mul:gate",
          "add:residual", "mul:up", "cast:float32", "bias;act:silu;mul:gate;add:residual",
          "act:gelu;mul:up;add:residual;cast:float32", "act:relu;bias;cast:bfloat16"]


def test_interpreter_checks():
    """Run this file's interpreter kernel checks in a child process that imports Triton in interpreter mode."""
    run_interpreter_checks(__file__, select='kernel', no_skips=True)  # every kernel check runs


# ------------------------------------------------------------------ chain descriptions


@pytest.mark.parametrize("text", [c for c in CHAINS if c])
def test_chain_string_round_trip(text):
    chain = EpilogueChain.parse(text)
    assert str(chain) == text
    assert EpilogueChain.parse(str(chain)) == chain


@pytest.mark.parametrize("text,message", [
    ("act:tanh", "argument 'tanh' is not one of"),
    ("scale:2", "kind must be one of"),
    ("mul:gate;mul:gate", "input 'gate' is used twice"),
    ("cast:float32;act:relu", "a cast must be the last step"),
    ("cast:float64", "argument 'float64'"),
    ("add:gate", "argument 'gate'"),
])
def test_invalid_chains_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        EpilogueChain.parse(text)


def test_chain_inputs_bias_and_dtype():
    chain = EpilogueChain.parse("act:silu;mul:up;add:residual;cast:bfloat16")
    assert chain.inputs == {"up", "residual"}
    assert chain.out_dtype(torch.float16) == torch.bfloat16
    assert str(chain.with_bias(True)) == "bias;act:silu;mul:up;add:residual;cast:bfloat16"
    placed = EpilogueChain.parse("act:relu;bias")
    assert placed.with_bias(True) == placed  # the chain already places the bias
    with pytest.raises(ValueError, match="needs the input 'gate'"):
        EpilogueChain.parse("mul:gate").check_inputs(gate=False)
    with pytest.raises(ValueError, match="does not use the input 'residual'"):
        EpilogueChain.parse("mul:gate").check_inputs(gate=True, residual=True)
    assert EpilogueChain((EpilogueStep("act", "gelu"),)) == EpilogueChain.of_activation("gelu", False)


def test_reference_order_matters():
    acc = torch.tensor([[-1.0, 2.0]])
    bias = torch.tensor([3.0, -3.0])
    assert EpilogueChain.parse("bias;act:relu").apply_ref(acc, bias=bias).tolist() == [[2.0, 0.0]]
    assert EpilogueChain.parse("act:relu;bias").apply_ref(acc, bias=bias).tolist() == [[3.0, -1.0]]


# ------------------------------------------------------------------ source, cache, debug dump


def test_generated_source_has_one_line_per_step():
    source = epi.epilogue_source(EpilogueChain.parse("bias;act:silu;mul:gate;add:residual;cast:float16"))
    body = source[source.index("v = acc"):]
    assert body.count("tl.load(") == 3 and "tl.sigmoid(v)" in body and "stores float16" in body
    assert "def epilogue(" in source and "@triton.jit" in source
    compile(source, "<generated>", "exec")
    # Different chains, different sources (and cache keys); equal chains, equal sources.
    assert epi.epilogue_source("act:relu") != epi.epilogue_source("act:relu2")
    assert epi.epilogue_source("act:relu") == epi.epilogue_source(EpilogueChain.parse("act:relu"))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory and an empty in-memory cache (emptied again afterwards)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(epi.DEBUG_DIR_ENV, raising=False)
    epi.clear_memory_cache()
    yield tmp_path
    epi.clear_memory_cache()


def test_cache_hit_by_source_hash(cache):
    chain = "bias;act:gelu;add:residual"
    before = dict(epi.CACHE_STATS)
    fn = epi.epilogue_function(chain)
    key = epi.source_hash(epi.epilogue_source(chain))
    path = cache / "cache" / epi.CACHE_SUBDIR / f"epilogue_{key}.py"
    assert path.read_text() == epi.epilogue_source(chain)
    assert epi.CACHE_STATS["disk_writes"] == before["disk_writes"] + 1
    # Same chain (as a string or a dataclass): the same function from memory.
    assert epi.epilogue_function(EpilogueChain.parse(chain)) is fn
    assert epi.CACHE_STATS["memory_hits"] == before["memory_hits"] + 1
    # A fresh process (memory cleared) loads the file without rewriting it.
    epi.clear_memory_cache()
    again = epi.epilogue_function(chain)
    assert again is not fn and again.fn.__code__.co_filename == fn.fn.__code__.co_filename == str(path)
    assert epi.CACHE_STATS["disk_writes"] == before["disk_writes"] + 1
    assert epi.CACHE_STATS["disk_loads"] == before["disk_loads"] + 2
    # A damaged file is rewritten, never imported as is.
    epi.clear_memory_cache()
    path.write_text("this is not python\n")
    epi.epilogue_function(chain)
    assert path.read_text() == epi.epilogue_source(chain)


def test_debug_dump(cache, monkeypatch):
    debug = cache / "debug"
    monkeypatch.setenv(epi.DEBUG_DIR_ENV, str(debug))
    source = epi.epilogue_source("act:silu;mul:up")
    epi.epilogue_function("act:silu;mul:up")
    assert (debug / f"epilogue_{epi.source_hash(source)}.py").read_text() == source


# ------------------------------------------------------------------ kernels in the interpreter (child process)


child = pytest.mark.skipif(not CHILD, reason="runs inside test_interpreter_checks' child process")


def randn(gen, *shape, dtype, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64, device=device) * scale).to(dtype)


def make_case(chain, dtype, m, n, k, block, density, seed, device="cpu"):
    """Inputs for ``chain`` and its float64 expectation: (kwargs for the kernel, expected)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    chain = EpilogueChain.parse(chain)
    scale = k ** -0.5  # keeps products O(1) at every K
    c = compress_block_weights(randn(gen, n, k, dtype=dtype, device=device, scale=scale), BlockWeights(block, density))
    x = randn(gen, m, k, dtype=dtype, device=device)
    kwargs = dict(x=x, blocks=c.blocks, row_ptr=c.row_ptr, col_idx=c.col_idx, epilogue=str(chain))
    extra = {}
    if "bias" in chain.inputs:
        kwargs["bias"] = extra["bias"] = randn(gen, n, dtype=dtype, device=device)
    if "gate" in chain.inputs:
        kwargs["gate"] = extra["gate"] = randn(gen, m, n, dtype=dtype, device=device)
    if "residual" in chain.inputs:
        # float32 residual with a low-precision x: extra inputs may have their own dtype.
        kwargs["residual"] = extra["residual"] = randn(gen, m, n, dtype=torch.float32, device=device)
    exact = torch.float64 if device == "cpu" else torch.float32
    acc = x.to(exact) @ c.to_dense().to(exact).T
    if "up" in chain.inputs:
        u = compress_block_weights(randn(gen, n, k, dtype=dtype, device=device, scale=scale),
                                   BlockWeights(block, density / 2))
        kwargs["up"] = (u.blocks, u.row_ptr, u.col_idx)
        extra["up"] = x.to(exact) @ u.to_dense().to(exact).T
    expected = chain.apply_ref(acc, **{name: t.to(exact) for name, t in extra.items()})
    return kwargs, expected.double(), chain.out_dtype(dtype)


def assert_matches(out, expected, dtype):
    assert out.dtype == dtype and out.shape == expected.shape
    assert bool(torch.isfinite(out).all()), "unwritten (poisoned) or non-finite outputs"
    scale = float(expected.abs().max().clamp(min=1.0))
    torch.testing.assert_close(out.double(), expected, atol=TOL[dtype] * scale, rtol=TOL[dtype])


@child
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chain", CHAINS)
def test_kernel_step_matches_reference(chain, dtype, swap_ab):
    from sparsecc.codegen.block_sparse_linear import BlockLinearConfig, block_sparse_linear

    kwargs, expected, out_dtype = make_case(chain, dtype, m=5, n=32, k=48, block=(16, 16), density=0.6,
                                            seed=len(chain))
    x = kwargs.pop("x")
    out = torch.full((5, 32), POISON, dtype=out_dtype)
    y = block_sparse_linear(x, kwargs.pop("blocks"), kwargs.pop("row_ptr"), kwargs.pop("col_idx"),
                            config=BlockLinearConfig(BLOCK_M=16, num_warps=4, num_stages=2, SWAP_AB=swap_ab),
                            out=out, **kwargs)
    assert y.data_ptr() == out.data_ptr()
    # One rounding at the end: a float32 result of low-precision operands keeps float32 accuracy.
    assert_matches(y, expected, out_dtype)


@child
def test_kernel_leading_dims_strided_gate_and_empty_rows():
    """3-D input, a transposed (strided) gate, and a weight with an empty block row."""
    from sparsecc.codegen.block_sparse_linear import block_sparse_linear

    gen = torch.Generator().manual_seed(11)
    w = randn(gen, 48, 32, dtype=torch.float32)
    w[16:32] = 0  # block row 1 stores nothing: its outputs are the chain of a zero accumulator
    c = compress_block_weights(w, BlockWeights((16, 16), 1.0, prune="keep"))
    x = randn(gen, 2, 3, 32, dtype=torch.float32)
    gate = randn(gen, 48, 2, 3, dtype=torch.float32).permute(1, 2, 0)  # [2, 3, 48], not contiguous
    bias = randn(gen, 48, dtype=torch.float32)
    y = block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, bias, epilogue="act:gelu;mul:gate", gate=gate)
    expected = torch.nn.functional.gelu(x.double() @ w.double().T + bias.double()) * gate.double()
    assert_matches(y, expected, torch.float32)


@child
def test_kernel_rejects_mismatched_inputs():
    from sparsecc.codegen.block_sparse_linear import block_sparse_linear

    c = compress_block_weights(torch.randn(32, 32), BlockWeights((16, 16), 0.5))
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="gate must have the output's shape"):
        block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, epilogue="mul:gate", gate=torch.randn(1, 32))
    with pytest.raises(ValueError, match="needs the input 'residual'"):
        block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, epilogue="add:residual")
    u = compress_block_weights(torch.randn(32, 32), BlockWeights((32, 16), 0.5))
    with pytest.raises(ValueError, match="must match the weight's 16x16 blocks"):
        block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, epilogue="mul:up", up=(u.blocks, u.row_ptr, u.col_idx))
    with pytest.raises(ValueError, match="either activation= or epilogue="):
        block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, activation="relu", epilogue="act:relu")


@child
def test_kernel_float64_runs_the_reference():
    from sparsecc.codegen.block_sparse_linear import block_sparse_linear

    kwargs, expected, _ = make_case("bias;act:silu;mul:up;add:residual", torch.float64, m=3, n=32, k=32,
                                    block=(16, 16), density=0.5, seed=3)
    kwargs["residual"] = kwargs["residual"].double()
    y = block_sparse_linear(kwargs.pop("x"), kwargs.pop("blocks"), kwargs.pop("row_ptr"), kwargs.pop("col_idx"),
                            **kwargs)
    torch.testing.assert_close(y, expected)


# ------------------------------------------------------------------ GPU: Llama shapes


gpu = pytest.mark.gpu
LLAMA = dict(m=8192, n=14336, k=4096, block=(64, 64), density=0.1)


@gpu
@pytest.mark.parametrize("swap_ab", [None, False, True])  # None: the default config
@pytest.mark.parametrize("chain", ["bias;act:silu", "act:silu;mul:gate", "act:silu;mul:up",
                                   "bias;act:gelu_tanh;add:residual", "act:relu2;cast:float32"])
def test_epilogue_gpu_llama(chain, swap_ab):
    from sparsecc.codegen.block_sparse_linear import BlockLinearConfig, block_sparse_linear

    dtype = torch.bfloat16
    kwargs, expected, out_dtype = make_case(chain, dtype, device="cuda", seed=1, **LLAMA)
    out = torch.full((LLAMA["m"], LLAMA["n"]), POISON, dtype=out_dtype, device="cuda")
    cfg = None if swap_ab is None else BlockLinearConfig(BLOCK_M=128, num_warps=8, num_stages=3, SWAP_AB=swap_ab)
    x = kwargs.pop("x")
    y = block_sparse_linear(x, kwargs.pop("blocks"), kwargs.pop("row_ptr"), kwargs.pop("col_idx"), config=cfg,
                            out=out, **kwargs)
    torch.cuda.synchronize()
    assert_matches(y, expected, out_dtype)


@gpu
def test_fused_gate_up_gpu_matches_two_launches():
    """The fused op equals gate and up as two kernels with the gate multiply folded, at Llama shapes."""
    from sparsecc.codegen.block_sparse_linear import block_sparse_linear

    kwargs, expected, _ = make_case("act:silu;mul:up", torch.bfloat16, device="cuda", seed=2, **LLAMA)
    x, up = kwargs["x"], kwargs["up"]
    fused = block_sparse_linear(x, kwargs["blocks"], kwargs["row_ptr"], kwargs["col_idx"], epilogue="act:silu;mul:up",
                                up=up)
    u = block_sparse_linear(x, *up)
    two = block_sparse_linear(x, kwargs["blocks"], kwargs["row_ptr"], kwargs["col_idx"], epilogue="act:silu;mul:gate",
                              gate=u)
    assert_matches(fused, expected, torch.bfloat16)
    assert_matches(two, expected, torch.bfloat16)


# ------------------------------------------------------------------ the op: schema and fake


@pytest.mark.parametrize("chain", ["act:silu;mul:gate;add:residual", "act:gelu;mul:up;cast:bfloat16", "bias"])
def test_op_schema_and_fake_with_chains(chain):
    """opcheck with the chain's extra inputs; the fake's dtype follows a cast step."""
    from sparsecc.codegen import ops

    torch.manual_seed(0)
    x = torch.randn(3, 5, 32)
    c = compress_block_weights(torch.randn(48, 32), BlockWeights((16, 16), 0.5))
    u = compress_block_weights(torch.randn(48, 32), BlockWeights((16, 16), 0.5))
    parsed = EpilogueChain.parse(chain)
    bias = torch.randn(48) if "bias" in parsed.inputs else None
    gate = torch.randn(3, 5, 48) if "gate" in parsed.inputs else None
    residual = torch.randn(3, 5, 48) if "residual" in parsed.inputs else None
    up = (u.blocks, u.row_ptr, u.col_idx) if "up" in parsed.inputs else (None, None, None)
    args = (x, c.blocks, c.row_ptr, c.col_idx, bias, 48, 32, "reference", chain, gate, residual, *up)
    torch.library.opcheck(ops.op("block_sparse_linear"), args, test_utils=("test_schema", "test_faketensor"))
    assert ops.op("block_sparse_linear")(*args).dtype == parsed.out_dtype(x.dtype)


def test_fused_gate_up_default_tile_is_capped():
    from sparsecc.codegen.block_sparse_linear import FUSED_MAX_BLOCK_M, pick_config

    single = pick_config(8192, 64, 64, blocks_per_row=6.4)
    fused = pick_config(8192, 64, 64, blocks_per_row=12.8, fused_up=True)
    assert single.BLOCK_M > FUSED_MAX_BLOCK_M == fused.BLOCK_M
    assert (fused.num_warps, fused.SWAP_AB) == (single.num_warps, single.SWAP_AB)
    assert pick_config(8, 16, 16, fused_up=True) == pick_config(8, 16, 16)
