"""A Triton driver that reports an sm_90 GPU, for compiling kernels on a machine without one.

Triton's compiler and its bundled ptxas need no GPU once the target is known, so a child process that calls
:func:`install` can ask any ``@triton.jit`` kernel for its PTX and cubin (``kernel.warmup(..., grid=...)``).
Nothing is launched. Used by the compile tests of tests/codegen (a child process each: Triton picks the
interpreter or the compiler when a kernel is decorated).
"""

import torch


def install() -> None:
    """Make Triton's active driver report one sm_90 device (never launches)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class Sm90(CudaDriver):
        def __init__(self):
            pass

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        @staticmethod
        def is_active():
            return True

    triton.runtime.driver.set_active(Sm90())
