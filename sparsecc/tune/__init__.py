"""``sparsecc.tune``: tune a spec on calibration data.

* :func:`tune` sets FFN activation thresholds per layer and projection (input
  mode, or gate mode) by a greedy search on the measured output error or by the
  separable allocation of a sensitivity table blended with uniform levels (on
  next-token KL for a causal LM), chooses per-head attention forms
  by recalled attention mass under a density budget, and writes a spec whose
  ``[meta.tune]`` records its provenance (docs/tune.md).
* :func:`tune_ffn` is the FFN search alone, for several targets at once.
* :func:`ffn_sensitivity` measures each FFN projection's output error alone at
  each sparsity level (the table behind the separable allocation, docs/tune.md).
* :mod:`sparsecc.tune.ffn_modes` chooses input or gate mode per FFN site (``mode="mixed"``);
  :mod:`sparsecc.tune.rotation` folds one rotation of a decoder's residual stream into its weights, so FFN
  thresholds act in that basis (docs/tune.md).
* :func:`cli_main` is the ``sparsecc tune`` command line.
* :mod:`sparsecc.tune.models` loads a causal LM and its tokenizer (``smollm2-135m``, a ``.gguf``
  file, a directory, a hub id); :mod:`sparsecc.tune.quality` computes perplexity, eagerly or through
  ``sparsecc.compile``, dense vs sparse; :mod:`sparsecc.tune.evalcli` is ``sparsecc eval``.
"""

import sys
import types

from sparsecc.tune.cli import cli_main
from sparsecc.tune.tuner import attention_rules, ffn_rules, ffn_sensitivity, measure, tune, tune_ffn

__all__ = ["tune", "tune_ffn", "ffn_sensitivity", "measure", "ffn_rules", "attention_rules", "cli_main"]


class _CallableModule(types.ModuleType):
    """``sparsecc.tune`` is both this package and the function: calling the module calls :func:`tune`."""

    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
