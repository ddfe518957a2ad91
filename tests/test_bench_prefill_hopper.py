"""bench/prefill_hopper.py's timing rounds, without a GPU: the candidates are timed in turns and each keeps the
median of its rounds (of two rounds, their mean: not whichever was slower)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import prefill_hopper  # noqa: E402


def test_rounds_rotate_the_order_and_keep_each_candidates_median(monkeypatch):
    order = []
    times = {"a": iter([1.0, 3.0, 2.0, 10.0]), "b": iter([4.0, 6.0, 5.0, 5.0])}
    monkeypatch.setattr(prefill_hopper, "bench", lambda fn: fn())
    candidates = {name: (lambda name=name: order.append(name) or next(times[name])) for name in ("a", "b")}
    assert prefill_hopper.timed(candidates, 2) == {"a": 2.0, "b": 5.0}   # (1 + 3) / 2, (4 + 6) / 2
    assert order == ["a", "b", "b", "a"]   # the second round starts one candidate later
    assert prefill_hopper.timed(candidates, 1) == {"a": 2.0, "b": 5.0}
    assert prefill_hopper.timed({"a": candidates["a"]}, 1) == {"a": 10.0}
