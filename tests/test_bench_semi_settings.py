"""bench/semi_settings.py: its 2:4 weights keep exactly two of every four, and it refuses bad arguments (and a
machine without CUDA) before any GPU work."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import semi_settings  # noqa: E402


def test_the_random_weight_keeps_two_of_every_four_along_k():
    gen = torch.Generator().manual_seed(3)
    w = semi_settings.random_2to4(32, 64, "cpu", torch.float32, gen)
    kept = (w.reshape(32, 16, 4) != 0).sum(-1)
    assert bool((kept == 2).all())


@pytest.mark.parametrize("flag", ["--tokens", "--searches", "--rounds"])
def test_a_count_below_one_is_refused_naming_the_flag(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        semi_settings.parse_args([flag, "0"])
    assert exc.value.code == 2
    assert f"{flag} 0 is not allowed; expected an integer >= 1" in capsys.readouterr().err


def test_a_token_count_cusparselt_would_pad_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        semi_settings.parse_args(["--tokens", "12"])
    assert exc.value.code == 2
    assert "--tokens 12 is not allowed; expected a multiple of 8" in capsys.readouterr().err


def test_without_cuda_it_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device with cuSPARSELt"):
        semi_settings.main([])
