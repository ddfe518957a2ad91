"""bench/ffn_stage1.py refuses malformed arguments before any GPU work, naming the entry and the allowed form."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ffn_stage1  # noqa: E402


def test_a_config_is_stage_one_on_tensor_cores_with_the_given_tile_and_warps():
    cfg = ffn_stage1.parse_config("64x128x4")
    assert (cfg.BLOCK_N, cfg.BLOCK_K, cfg.num_warps, cfg.ROWS_PER_SPLIT, cfg.DOT) == (64, 128, 4, 4096, True)


def test_a_fourth_field_splits_d_into_that_many_channels():
    cfg = ffn_stage1.parse_config("256x64x8x1024")
    assert (cfg.BLOCK_N, cfg.BLOCK_K, cfg.num_warps, cfg.ROWS_PER_SPLIT, cfg.DOT) == (256, 64, 8, 1024, True)


def test_several_tokens_take_the_tl_dot_union_with_the_dot_flag_unset():
    cfg = ffn_stage1.parse_config("64x64x8x2048", tokens=4)
    assert (cfg.BLOCK_N, cfg.BLOCK_K, cfg.num_warps, cfg.ROWS_PER_SPLIT, cfg.DOT) == (64, 64, 8, 2048, False)


@pytest.mark.parametrize("text, stages", [("64x128x4s4", 4), ("256x64x8x1024s2", 2), ("64x128x4", 3)])
def test_a_suffix_sets_the_pipelining_stages(text, stages):
    assert ffn_stage1.parse_config(text).STAGES == stages


@pytest.mark.parametrize("text", ["64x100x4", "8x128x4", "64x8192x4", "64x128", "abc", "64x128x4x100",
                                  "64x128x4x64", "64x128x4x1024x2", "64x128x4s0", "64x128x4s", "64x128x4sx",
                                  "64x128s4x4"])
def test_a_malformed_config_names_itself_and_the_allowed_form(text):
    with pytest.raises(ValueError, match=rf"config '{text}' is not allowed: expected NxKxW or NxKxWxR"):
        ffn_stage1.parse_config(text)


@pytest.mark.parametrize("args, message", [
    (["--configs", "64x100x4"], "config '64x100x4' is not allowed"),
    (["--dtypes", "float64"], "--dtypes: 'float64' is not allowed; expected float16 or bfloat16"),
    (["--sparsities", "0.5,1.5"], "expected comma-separated numbers in (0, 1)"),
    (["--rounds", "0"], "--rounds 0 is not allowed"),
    (["--tokens", "0"], "--tokens 0 is not allowed; expected an integer from 1 to 16"),
    (["--tokens", "17"], "--tokens 17 is not allowed; expected an integer from 1 to 16"),
    (["--tokens", "2", "--configs", "8x128x4"], "config '8x128x4' is not allowed"),
])
def test_the_command_line_refuses_bad_arguments_before_touching_the_gpu(args, message):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ffn_stage1.py"), *args], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 2
    assert message in run.stderr
