"""The cost model: hardware profiles, sympy cost formulas per form, predictions and crossovers.

``check`` steps call ``estimate_attention`` / ``estimate_linear`` /
``estimate_ffn`` (in ``sparsecc.cost.sites``), which build the dense and
sparse formulas for a site, evaluate them at the site's sizes, and, for
symbolic sequence lengths, solve for the crossover. They return one
``Estimate`` (``sparsecc.cost.estimate``), which the decision carries and the
report embeds.
"""

from sparsecc.cost.estimate import Crossover, Estimate
from sparsecc.cost.hardware import CPU, H100_SXM, PROFILES, HardwareProfile, profile_for
from sparsecc.cost.model import crossover, predict
from sparsecc.cost.sites import ASSUMED_ACTIVATION_SPARSITY, estimate_attention, estimate_ffn, estimate_linear

__all__ = ["HardwareProfile", "profile_for", "PROFILES", "CPU", "H100_SXM", "Estimate", "Crossover", "predict",
           "crossover", "estimate_attention", "estimate_linear", "estimate_ffn", "ASSUMED_ACTIVATION_SPARSITY"]
