"""``sparsecc.passes``: the graph passes of the pipeline (normalize, search, check, replace, epilogue folding).

Each site family has a module (``attention``/``attention_check``, ``ffn``, ``linear``); ``site`` and
``decide`` hold what they share. Passes read the graph (``torch.fx``), the spec and the cost model, and
emit ``torch.ops.sparsecc`` calls from ``sparsecc.codegen.ops``.

Layering (``tests/test_layering.py`` checks it): passes may import the core (``sparsecc.forms``,
``sparsecc.spec``, ``sparsecc.layouts``, ``sparsecc.weights``, ``sparsecc.kernel_tiles``, ``sparsecc.cache``,
``sparsecc.activations``, ``sparsecc.cost``),
``sparsecc.codegen`` and each other; never ``sparsecc.pipeline``, the backend, the API, ``sparsecc.tune`` or
the report.
"""
