"""The greedy FFN allocation: hits the target average, and beats or equals uniform thresholds."""

import pytest

from sparsecc.tune import measure, tune_ffn
from sparsecc.tune.ffn import uniform_allocation
from tests.tune import models


@pytest.mark.parametrize("criterion", ["magnitude", "weighted"])
def test_greedy_beats_or_equals_uniform(criterion):
    model = models.Stack().eval()
    batches = models.batches()
    tuning = tune_ffn(model, batches, [0.3, 0.5], criterion=criterion, step=0.1, progress=False)
    for target in (0.3, 0.5):
        alloc = tuning.allocation(target)
        assert alloc.average(tuning.projections) == pytest.approx(target, abs=1e-9)
        greedy, _ = measure(model, batches, tuning.projections, alloc.taus, criterion)
        uniform, _ = measure(model, batches, tuning.projections,
                             uniform_allocation(tuning.projections, tuning.scores, target), criterion)
        assert greedy == pytest.approx(alloc.error, rel=1e-9)   # the error it reports is the one measured
        assert greedy <= uniform * (1 + 1e-9), (target, greedy, uniform)
    # The loud (sensitive) layer is spared: its down projection ends below the average.
    alloc = tuning.allocation(0.5)
    loud_down = next(p for p in tuning.projections if p.site == "layers.1" and p.key == "down")
    assert alloc.levels[loud_down] < 0.5


def test_measured_sparsity_follows_the_levels():
    model = models.Stack().eval()
    batches = models.batches()
    tuning = tune_ffn(model, batches, [0.4], step=0.1, progress=False)
    alloc = tuning.allocation(0.4)
    _, measured = measure(model, batches, tuning.projections, alloc.taus, "magnitude")
    # Taus are quantiles of the dense run: the first projection sees exactly that distribution; later ones see
    # inputs shifted by the thresholds upstream, so their measured sparsity drifts a little.
    first = tuning.projections[0]
    assert measured[first] == pytest.approx(alloc.levels[first], abs=0.01)
    for p in tuning.projections:
        assert measured[p] == pytest.approx(alloc.levels[p], abs=0.05)


def test_bad_arguments_are_named():
    model = models.Stack().eval()
    with pytest.raises(ValueError, match="criterion"):
        tune_ffn(model, models.batches(1), [0.5], criterion="l1", progress=False)
    with pytest.raises(ValueError, match="target"):
        tune_ffn(model, models.batches(1), [0.99], progress=False)
