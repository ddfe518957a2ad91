"""tests/budgets.py: slow property tests keep a small ci count, and the deep profile still raises them."""

from tests import budgets


def test_ci_counts_are_capped_by_the_profile_and_deep_multiplies_them(monkeypatch):
    monkeypatch.setattr(budgets, "DEEP", False)
    assert budgets.examples(15).max_examples == 15
    assert budgets.examples(10_000).max_examples == budgets.settings.default.max_examples   # ci's own cap
    monkeypatch.setattr(budgets, "DEEP", True)
    assert budgets.examples(15).max_examples == 15 * budgets.DEEP_FACTOR > 15
    assert budgets.examples(8).deadline is None


def test_the_interpreter_kernel_tests_take_their_budget_from_here(monkeypatch):
    """The kernels' property tests under the interpreter once capped deep at their ci count (``min(profile, 15)``):
    loaded under deep, their budgets must be DEEP_FACTOR times the ci counts 15, 10 and 8."""
    import importlib
    modules = [importlib.import_module(f"tests.codegen.{name}")
               for name in ("test_ffn_kernels", "test_attention_kernels", "test_dynamic_attention")]
    monkeypatch.setattr(budgets, "DEEP", True)
    try:
        deep = [importlib.reload(module).FEW.max_examples for module in modules]
    finally:
        monkeypatch.undo()
        for module in modules:
            importlib.reload(module)
    assert deep == [n * budgets.DEEP_FACTOR for n in (15, 10, 8)]
    assert [module.FEW.max_examples for module in modules] == [15, 10, 8]   # ci again, as the suite runs them
