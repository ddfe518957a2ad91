"""An independent differential oracle for sparsecc, and metamorphic tests.

* ``oracle.py`` computes expected outputs from the text of docs/spec.md alone
  (imports only torch and math): per-head rule resolution and policies,
  attention keep masks for every form (positions ``p = i + Sk - Sq``), float64
  masked softmax attention, activation thresholds, 2:4 and block pruning. Where
  the spec leaves a value undefined (a row with no kept key, a dynamic
  selection within float32 rounding of a tie or of the cdf boundary, pruning
  ties) it says so, and those values are not compared.
* ``test_oracle.py`` checks the oracle itself on cases worked out by hand.
* ``test_differential.py`` compiles models written in the tests with
  ``backend="sparsecc"`` (``kernels="reference"``, ``policy = "force"``),
  asserts that the form was applied, and compares with the oracle.
* ``test_metamorphic.py`` compares pairs of compiled runs the spec says agree.
* ``cases.py`` / ``harness.py``: attention cases and hypothesis strategies,
  model spellings, compile helpers. No expected value comes from them.

Tests of known product bugs are ``xfail(strict=True)`` with the bug in the
reason and its minimal reproduction as an explicit ``@example``: remove the
marker when the bug is fixed.

Budgets: the default ``ci`` hypothesis profile runs the directory in a few
minutes on 2 CPU cores; ``HYPOTHESIS_PROFILE=deep python -m pytest tests/oracle``
runs every hypothesis test with the profile's 2000 examples (about 45 tests,
so ~90,000 cases; hours on 2 cores).
"""
