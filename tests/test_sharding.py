"""sparsecc.sharding's pure helpers (the two-process tests are in tests/distributed/)."""

import pytest
import torch

from sparsecc.sharding import format_span, head_span, is_dtensor, local_tensor, shard_of


def test_head_span_maps_a_feature_slice_to_global_heads():
    # rank 1 of 2 computes features 32..63 of 64, heads of 16: global heads 2-3 of 4
    assert head_span(32, 32, 64, head_dim=16, local_heads=2) == (2, 4)
    assert head_span(0, 64, 64, head_dim=16, local_heads=4) == (0, 4)    # replicated: every head


@pytest.mark.parametrize("first, local, total, heads, words", [
    (8, 8, 16, 1, "not a whole number of heads"),      # one KV head of 16 split in halves
    (32, 32, 64, 1, "holds 2 heads, but the attention sees 1"),
])
def test_head_span_refuses_what_it_cannot_establish(first, local, total, heads, words):
    with pytest.raises(ValueError, match=words):
        head_span(first, local, total, head_dim=16, local_heads=heads)


def test_plain_tensors_are_not_sharded():
    t = torch.ones(2, 3)
    assert not is_dtensor(t) and shard_of(t) is None and local_tensor(t) is t
    assert format_span(2, 2) == "2-3" and format_span(1, 1) == "1"
