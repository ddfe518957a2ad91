"""cuSPARSELt plans made once per shape (codegen/cusparselt_plan.py), against a stand-in library.

The stand-in records every C call with its arguments as plain numbers; the expected descriptors are written from
cuSPARSELt's public header (cusparseLt.h: CUSPARSE_ORDER_COL = 1, CUSPARSE_ORDER_ROW = 2,
CUSPARSE_OPERATION_TRANSPOSE = 1, CUSPARSE_COMPUTE_32F = 2, CUSPARSELT_MATMUL_BIAS_POINTER = 8,
CUSPARSELT_MATMUL_ALG_CONFIG_ID = 0, CUSPARSELT_MATMUL_SPLIT_K = 3, CUSPARSELT_MATMUL_SPLIT_K_MODE = 4;
CUDA_R_16BF = 14) and from the product torch's ``_cslt_sparse_mm(W, xᵀ, transpose_result=True)`` computes:
W [N, K] row major, xᵀ read from row-major x [M, K], y written [N, M] column major. The GPU tests compare the
numbers with torch's op (tests/codegen/test_ffn_kernels.py) and a float64 oracle (tests/test_gpu_pipeline.py).
"""

import ctypes
import types

import pytest
import torch

from sparsecc.codegen import cusparselt_plan as cp

ROW, COL, TRANSPOSE, NON_TRANSPOSE, COMPUTE_32F, BF16 = 2, 1, 1, 0, 2, 14


def _value(arg):
    if isinstance(arg, ctypes._SimpleCData):
        return arg.value
    return arg


WORKSPACE = 4096   # bytes the stand-in's plans ask for


class StandIn:
    """cuSPARSELt's entry points as Python functions returning status 0 (or ``fail`` for one of them). Like a C
    function called through ctypes without declared argument types, it takes ctypes values and pointers only: a
    bare Python number would reach the library as a 32-bit int."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def __getattr__(self, name):
        def entry(*args):
            for a in args:
                assert isinstance(a, (ctypes._SimpleCData, type(ctypes.byref(ctypes.c_int())))), (name, a)
            values = [_value(a) for a in args]
            if name in ("cusparseLtMatmulDescSetAttribute", "cusparseLtMatmulAlgSetAttribute"):
                data = ctypes.cast(args[3], ctypes.POINTER(ctypes.c_int64 if values[2] == 8 and
                                                          name == "cusparseLtMatmulDescSetAttribute" else ctypes.c_int))
                values[3] = data.contents.value
            if name == "cusparseLtMatmulGetWorkspace":
                args[2]._obj.value = WORKSPACE
            self.calls.append((name, values))
            return 7 if name == self.fail else 0
        return entry


@pytest.fixture
def library(monkeypatch):
    """A stand-in library behind planned_product, on a 'device' 0 whose stream is 0; plans start empty."""
    lib = StandIn()
    library = types.SimpleNamespace(lib=lib, handle=lambda device: cp._Opaque())

    def check(status, call):
        if status != 0:
            raise RuntimeError(f"{call} failed ({status})")
    library.check = check
    monkeypatch.setattr(cp, "_library", lambda: (library, ""))
    monkeypatch.setattr(cp, "_PLANS", {})
    monkeypatch.setattr(cp, "_REFUSED", {})
    monkeypatch.setattr(cp, "_cuda_index", lambda t: 0)   # the stand-in's 'device' holds CPU tensors
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=1234))
    monkeypatch.setattr(cp, "_FALLBACKS", cp.Counter())
    return library


def _calls(lib, name):
    return [values for call, values in lib.calls if call == name]


def test_a_plan_describes_torchs_product_and_is_made_once_per_shape(library):
    n, k, m = 32, 64, 16
    packed = torch.zeros(n * k * 9 // 16, dtype=torch.bfloat16)
    x, bias = torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    out = cp.planned_product(packed, x, n, bias, (17, 1, None))
    assert out is not None and tuple(out.shape) == (m, n) and out.dtype == torch.bfloat16
    lib = library.lib
    sparse = _calls(lib, "cusparseLtStructuredDescriptorInit")[0][2:]
    assert sparse == [n, k, k, 16, BF16, ROW, 0]           # W: N x K, leading dimension K, row major, 50%
    dense, result = (d[2:] for d in _calls(lib, "cusparseLtDenseDescriptorInit"))
    assert dense == [m, k, k, 16, BF16, ROW]                 # x: M x K row major (read transposed)
    assert result == [n, m, n, 16, BF16, COL]                # y: N x M column major, i.e. [M, N] row major
    matmul = _calls(lib, "cusparseLtMatmulDescriptorInit")[0]
    assert matmul[2:4] == [NON_TRANSPOSE, TRANSPOSE] and matmul[-1] == COMPUTE_32F
    assert _calls(lib, "cusparseLtMatmulDescSetAttribute")[0][2:4] == [8, bias.data_ptr()]
    assert [a[2:4] for a in _calls(lib, "cusparseLtMatmulAlgSetAttribute")] == [[0, 17]]   # no split asked: none set
    product = _calls(lib, "cusparseLtMatmul")[0]
    assert product[3:5] == [packed.data_ptr(), x.data_ptr()] and product[6] == product[7] == out.data_ptr()
    assert product[8] not in (None, 0) and product[10] == 1   # a workspace of the plan's size, one stream

    cp.planned_product(packed, x, n, bias, (17, 1, None))
    assert cp.plan_count() == 1 and len(_calls(lib, "cusparseLtMatmul")) == 2
    cp.planned_product(packed, torch.zeros(2 * m, k, dtype=torch.bfloat16), n, bias, (17, 1, None))
    cp.planned_product(packed, x, n, bias.clone(), (17, 1, None))   # the bias address is part of the plan
    cp.planned_product(packed, x, n, None, (17, 1, None))
    assert cp.plan_count() == 4


def test_split_k_settings_reach_the_plan(library):
    packed, x = torch.zeros(32 * 64 * 9 // 16, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16)
    cp.planned_product(packed, x, 32, None, (17, -1, 2))
    assert [a[2:4] for a in _calls(library.lib, "cusparseLtMatmulAlgSetAttribute")] == [[0, 17], [3, -1], [4, 2]]
    assert not _calls(library.lib, "cusparseLtMatmulDescSetAttribute")   # no bias, no bias pointer


def test_refusals_fall_back_to_torchs_op(library, monkeypatch):
    packed, x = torch.zeros(32 * 64 * 9 // 16, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16)
    library.lib.fail = "cusparseLtMatmulPlanInit"
    assert cp.planned_product(packed, x, 32, None, (5, 1, None)) is None
    assert cp.planned_product(packed, x, 32, None, (5, 1, None)) is None
    assert len(_calls(library.lib, "cusparseLtMatmulPlanInit")) == 1 and cp.plan_count() == 0   # refusal remembered
    library.lib.fail = None
    unaligned = torch.zeros(8 * 64 + 1, dtype=torch.bfloat16)[1:].view(8, 64)
    assert cp.planned_product(packed, unaligned, 32, None, (0, 1, None)) is None
    assert cp.planned_product(packed.float(), x.float(), 32, None, (0, 1, None)) is None
    monkeypatch.setattr(cp, "PLAN_LIMIT", 0)
    assert cp.planned_product(packed, x, 32, None, (0, 1, None)) is None


def test_mismatched_operands_fall_back_and_are_counted(library):
    packed, x = torch.zeros(32 * 64 * 9 // 16, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16)
    assert cp.planned_product(packed.half(), x, 32, None, (0, 1, None)) is None        # operand of another dtype
    assert cp.planned_product(packed[:-1], x, 32, None, (0, 1, None)) is None          # buffer short of N x K
    assert cp.planned_product(packed, x, 32, torch.zeros(32), (0, 1, None)) is None    # float32 bias
    counts = cp.fallback_counts()
    assert sum(counts.values()) == 3 and any("short of a 32 x 64 matrix" in r for r in counts)
    assert cp.plan_count() == 0 and not _calls(library.lib, "cusparseLtMatmul")


def test_split_mode_codes():
    """torch 2.11 reports split_k_mode as cuSPARSELt's enum (1 one kernel, 2 two kernels, -1 default); older builds
    report split_k_one_kernel as a bool."""
    assert [cp.split_mode_code(m) for m in (None, -1, 1, 2, True, False)] == [None, None, 1, 2, 1, 2]


def test_tensors_off_cuda_never_reach_the_library():
    x = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert cp._cuda_index(x) is None
    assert cp.planned_product(torch.zeros(288 * 4, dtype=torch.bfloat16), x, 32, None, (0, 1, None)) is None


def test_an_old_library_or_none_is_not_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cp, "_Library", lambda: types.SimpleNamespace(version=cp.MIN_VERSION - 100))
    cp._library.cache_clear()
    try:
        assert "older than" in cp.plans_unavailable_reason()
        cp._library.cache_clear()
        monkeypatch.setattr(cp, "_Library", lambda: (_ for _ in ()).throw(OSError("libcusparseLt.so.0 not found")))
        assert "could not be used" in cp.plans_unavailable_reason()
        x = torch.zeros(8, 64, dtype=torch.bfloat16)
        assert cp.planned_product(torch.zeros(288 * 4, dtype=torch.bfloat16), x, 32, None, (0, 1, None)) is None
    finally:
        cp._library.cache_clear()
