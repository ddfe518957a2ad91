"""tests/budgets.py: slow property tests keep a small ci count, and the deep profile still raises them."""

from tests import budgets


def test_ci_counts_are_capped_by_the_profile_and_deep_multiplies_them(monkeypatch):
    monkeypatch.setattr(budgets, "DEEP", False)
    assert budgets.examples(15).max_examples == 15
    assert budgets.examples(10_000).max_examples == budgets.settings.default.max_examples   # ci's own cap
    monkeypatch.setattr(budgets, "DEEP", True)
    assert budgets.examples(15).max_examples == 15 * budgets.DEEP_FACTOR > 15
    assert budgets.examples(8).deadline is None


def test_the_interpreter_kernel_tests_take_their_budget_from_here():
    """The kernels' property tests under the interpreter once capped deep at their ci count (``min(profile, 15)``)."""
    import tests.codegen.test_attention_kernels as attention
    import tests.codegen.test_dynamic_attention as dynamic
    import tests.codegen.test_ffn_kernels as ffn
    assert (ffn.FEW.max_examples, attention.FEW.max_examples, dynamic.FEW.max_examples) == tuple(
        budgets.examples(n).max_examples for n in (15, 10, 8))
