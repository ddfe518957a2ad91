"""``sparsecc.codegen``: the sparse ops (``ops``), their PyTorch references and their Triton kernels.

One file per kernel family with its ``*_ref`` beside it; ``ops`` registers ``torch.ops.sparsecc`` and loads
a kernel module only when an op first runs on a device that has it (importing sparsecc imports no Triton).

Layering (``tests/test_layering.py`` checks it): codegen may import the core (``sparsecc.forms``,
``sparsecc.spec``, ``sparsecc.layouts``, ``sparsecc.weights``, ``sparsecc.kernel_tiles``, ``sparsecc.cache``,
``sparsecc.activations``) and itself; never
``sparsecc.passes``, ``sparsecc.pipeline``, the backend, the API, ``sparsecc.tune``, the report or the cost
model (which describes the kernels from the outside).
"""
