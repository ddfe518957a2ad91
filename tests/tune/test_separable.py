"""The sensitivity table and the separable allocation built on it."""

import itertools

import pytest
import torch

from sparsecc.tune import measure
from sparsecc.tune.capture import Projection, quantile_tau
from sparsecc.tune.ffn import Sensitivity, separable_allocation
from sparsecc.tune.tuner import ffn_sensitivity
from tests.tune import models

LEVELS = (0.2, 0.4, 0.6, 0.8)


def _projections(weights):
    return [Projection(f"layer{i}", "input", (f"layer{i}.fc",), (False,), w) for i, w in enumerate(weights)]


def _scores(projections):
    # Uniform scores on [0, 1): the tau of level s is about s, so taus can be checked by eye.
    return {p: torch.linspace(0, 1, 1001)[:-1] for p in projections}


def _modelled_error(table, p, level):
    """The table's error of ``p`` at ``level``, linearly interpolated from (0, 0) (curves here are convex)."""
    xs, ys = (0.0,) + table.levels, (0.0,) + table.errors[p]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x0 <= level <= x1 + 1e-12:
            return y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    raise AssertionError(level)


def test_cheap_projection_is_filled_first_and_the_target_is_hit():
    cheap, dear = _projections([100, 100])
    table = Sensitivity(LEVELS, {cheap: (0.001, 0.002, 0.004, 0.1), dear: (0.01, 0.03, 0.07, 0.2)})
    (alloc,) = separable_allocation(table, [cheap, dear], _scores([cheap, dear]), [0.35])
    # Per unit of average sparsity (share 1/2, steps of 0.2): cheap costs 0.01, 0.01, 0.02, 0.96; dear 0.1, 0.2,
    # 0.4, 1.3. An average of 0.35 takes cheap's first three segments (0.3 of it) and half of dear's first
    # (level 0.1, error 0.005).
    assert alloc.levels[cheap] == pytest.approx(0.6)
    assert alloc.levels[dear] == pytest.approx(0.1)
    assert alloc.average([cheap, dear]) == pytest.approx(0.35)
    assert alloc.error == pytest.approx(0.004 + 0.005)
    assert alloc.evaluations == 0
    assert alloc.taus[cheap] == pytest.approx(0.6, abs=2e-3)


def test_weights_set_the_price_of_sparsity():
    small, large = _projections([100, 300])
    same = (0.01, 0.03, 0.07, 0.2)
    (alloc,) = separable_allocation(Sensitivity(LEVELS, {small: same, large: same}), [small, large],
                                    _scores([small, large]), [0.2])
    # Equal errors per level, but a level of the large projection buys three times the average sparsity.
    assert alloc.levels[large] > alloc.levels[small]
    assert alloc.average([small, large]) == pytest.approx(0.2)


def test_matches_brute_force_on_convex_curves():
    g = torch.Generator().manual_seed(3)
    projections = _projections([1, 1, 1])
    errors = {}
    for p in projections:
        increments = torch.rand(len(LEVELS), generator=g, dtype=torch.float64).sort().values
        errors[p] = tuple(float(v) for v in increments.cumsum(0))   # increasing steps: convex curves
    table = Sensitivity(LEVELS, errors)
    grid = (0.0,) + LEVELS
    for target in (0.2, 0.4, 0.6):
        best = min(sum(_modelled_error(table, p, lv) if lv else 0.0 for p, lv in zip(projections, combo))
                   for combo in itertools.product(grid, repeat=3) if abs(sum(combo) / 3 - target) < 1e-9)
        (alloc,) = separable_allocation(table, projections, _scores(projections), [target])
        assert alloc.error == pytest.approx(best, rel=1e-9), target
        modelled = sum(_modelled_error(table, p, alloc.levels[p]) for p in projections if alloc.levels[p] > 0)
        assert modelled == pytest.approx(alloc.error, rel=1e-9)


def test_non_convex_curve_uses_its_hull():
    bumpy, plain = _projections([1, 1])
    # bumpy: expensive first step, then free: its hull goes straight from (0, 0) to (0.8, 0.04), 0.05 per level.
    table = Sensitivity(LEVELS, {bumpy: (0.04, 0.04, 0.04, 0.04), plain: (0.02, 0.06, 0.12, 0.2)})
    (alloc,) = separable_allocation(table, [bumpy, plain], _scores([bumpy, plain]), [0.4])
    assert alloc.levels[bumpy] == pytest.approx(0.8)
    assert alloc.levels[plain] == pytest.approx(0.0)


def test_max_level_and_bad_inputs_are_named():
    a, b = _projections([1, 1])
    table = Sensitivity(LEVELS, {a: (0.0, 0.0, 0.0, 0.0), b: (0.1, 0.2, 0.3, 0.4)})
    (alloc,) = separable_allocation(table, [a, b], _scores([a, b]), [0.45], max_level=0.6)
    assert alloc.levels[a] == pytest.approx(0.6)   # free, but capped by max_level
    assert alloc.levels[b] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="target"):
        separable_allocation(table, [a, b], _scores([a, b]), [0.7], max_level=0.6)
    with pytest.raises(ValueError, match="levels"):
        Sensitivity((0.4, 0.2), {})
    with pytest.raises(ValueError, match="levels"):
        Sensitivity((0.5, 1.0), {})
    with pytest.raises(ValueError, match="one per level"):
        Sensitivity(LEVELS, {a: (0.1,)})
    with pytest.raises(ValueError, match="no errors"):
        separable_allocation(Sensitivity(LEVELS, {a: (0.0,) * 4}), [a, b], _scores([a, b]), [0.2])


def test_table_is_the_measured_error_of_each_projection_alone():
    model = models.Stack().eval()
    batches = models.batches()
    result = ffn_sensitivity(model, batches, levels=(0.3, 0.6), progress=False)
    assert result.forwards == len(result.projections) * 2
    p = result.projections[3]
    alone, measured = measure(model, batches, [p], {p: quantile_tau(result.scores[p], 0.6)}, "magnitude")
    assert result.sensitivity.errors[p][1] == pytest.approx(alone, rel=1e-12)
    for row in result.sensitivity.errors.values():
        assert 0 < row[0] < row[1]
    # The loud layer (scaled-up down weights) is the most sensitive at every level.
    loud = next(q for q in result.projections if q.site == "layers.1" and q.key == "down")
    quiet = [q for q in result.projections if q.key == "down" and q is not loud]
    assert all(result.sensitivity.errors[loud][i] > result.sensitivity.errors[q][i] for q in quiet for i in (0, 1))
    assert "layers.1:down" in str(result.sensitivity)


def test_separable_spares_the_loud_layer_and_is_deterministic():
    model = models.Stack().eval()
    batches = models.batches()
    first = ffn_sensitivity(model, batches, progress=False).allocations([0.5])[0]
    again = ffn_sensitivity(model, batches, progress=False).allocations([0.5])[0]
    assert first.levels == again.levels and first.taus == again.taus
    projections = list(first.levels)
    assert first.average(projections) == pytest.approx(0.5)
    loud = next(q for q in projections if q.site == "layers.1" and q.key == "down")
    assert first.levels[loud] < 0.5


def test_refined_table_interpolates_log_linearly_and_keeps_the_measured_levels():
    (p,) = _projections([100])
    table = Sensitivity((0.2, 0.4, 0.6), {p: (1e-3, 4e-3, 1.6e-2)})
    fine = table.refined(0.1)
    assert fine.levels == pytest.approx((0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
    # Between measured levels: the geometric mean; below 20%: the power law through the first two (exponent 2).
    assert fine.errors[p] == pytest.approx((2.5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2))
    # A zero error makes its segment linear.
    flat = Sensitivity((0.2, 0.4), {p: (0.0, 2e-3)}).refined(0.1)
    assert flat.errors[p] == pytest.approx((0.0, 0.0, 1e-3, 2e-3))


def _scripted_blends(monkeypatch, per_batch_errors):
    """blend_with_uniform with measure() replaced by fixed per-batch errors per blend (keyed by the first level)."""
    from sparsecc.tune import tuner
    from sparsecc.tune.tuner import FfnSensitivity, blend_with_uniform
    cheap, dear = _projections([100, 100])
    table = Sensitivity(LEVELS, {cheap: (0.001, 0.002, 0.004, 0.1), dear: (0.01, 0.03, 0.07, 0.2)})
    sens = FfnSensitivity([cheap, dear], _scores([cheap, dear]), table, "magnitude", 0,
                          search_batches=[0, 1], dense=[None, None])
    (separable,) = separable_allocation(table, [cheap, dear], sens.scores, [0.35])
    blend_of = {round(b * separable.levels[cheap] + (1 - b) * 0.35, 9): b for b in tuner.SEPARABLE_BLENDS}

    def fake_measure(model, batches, projections, taus, criterion, error_fn=None, dense=None, per_batch=None):
        level = next(lv for lv in blend_of if abs(float(taus[cheap]) - float(quantile_tau(sens.scores[cheap], lv)))
                     < 1e-9)
        errors = per_batch_errors[blend_of[level]]
        per_batch.extend(errors)
        return sum(errors) / len(errors), {}

    monkeypatch.setattr(tuner, "measure", fake_measure)
    (alloc,) = blend_with_uniform(None, sens, [0.35], None, 0.95, progress=False).allocations
    return alloc, separable


def test_a_blend_replaces_uniform_only_when_no_search_batch_contradicts_it(monkeypatch):
    # Blend 1 has the lowest mean error but is worse than uniform on batch 1: uniform wins, not blend 1.
    alloc, separable = _scripted_blends(monkeypatch, {1.0: [0.10, 0.50], 0.5: [0.40, 0.45], 0.0: [0.60, 0.45]})
    assert alloc.error == pytest.approx(0.425)          # blend 0.5: no worse than uniform on either batch
    alloc, _ = _scripted_blends(monkeypatch, {1.0: [0.10, 0.50], 0.5: [0.40, 0.50], 0.0: [0.60, 0.45]})
    assert alloc.error == pytest.approx(0.525)          # every other blend loses a batch: uniform levels
    assert all(abs(level - 0.35) < 1e-12 for level in alloc.levels.values())
    alloc, _ = _scripted_blends(monkeypatch, {1.0: [0.10, 0.20], 0.5: [0.40, 0.45], 0.0: [0.60, 0.45]})
    assert all(alloc.levels[p] == pytest.approx(separable.levels[p]) for p in alloc.levels)
    assert alloc.error == pytest.approx(0.15)
