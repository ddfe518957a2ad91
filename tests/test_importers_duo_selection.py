"""DuoAttention head selection: ``threshold`` and ``sparsity``, checked against DuoAttention's rule.

DuoAttention's ``sparsify_attention_heads`` (mit-han-lab/duo-attention @ fe93c31,
``duo_attn/utils.py``) adds uniform noise in [0, 1e-6) to the clipped gates, takes their
``sparsity`` quantile over all layers with numpy, and streams the heads strictly below it.
The tests recompute that rule with numpy and noise (several seeds), and also by sorting.
"""

import math
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc import SparseccWarning, cli, load_spec
from sparsecc.importers import import_duo_attention, import_spec, streaming_count
from sparsecc.spec import SpecError

np = pytest.importorskip("numpy")

DATA = Path(__file__).parent / "data" / "importers"
LLAMA3 = DATA / "duo_llama3_8b_1048k"   # published pattern, see its README.md


def duo_rule_counts(gates, sparsity, seeds=range(5)):
    """Streaming-head counts of DuoAttention's rule (numpy quantile of noisy gates), one per seed."""
    clipped = np.clip(np.asarray(gates, dtype=float), 0, 1)
    counts = set()
    for seed in seeds:
        noisy = clipped + np.random.default_rng(seed).uniform(0, 1e-6, clipped.shape)
        if sparsity >= 1:
            threshold = 2.0
        elif sparsity <= 0:
            threshold = -1.0
        else:
            threshold = np.quantile(noisy, sparsity)
        counts.add(int((noisy < threshold).sum()))
    return counts


def sorted_selection(gates, k):
    """The k (layer, kv) pairs of lowest clipped gate, ties to the earlier layer, then the lower KV head."""
    flat = sorted((min(max(g, 0.0), 1.0), layer, kv) for layer, row in enumerate(gates) for kv, g in enumerate(row))
    return {(layer, kv) for _, layer, kv in flat[:k]}


def imported_kv_heads(spec, group):
    """(layer, kv head) pairs of the streaming rules of an imported spec (modules model.layers.{i}.self_attn)."""
    pairs = set()
    for rule in spec.attention:
        layer = int(rule.modules.split(".")[2])
        kvs = {h // group for h in rule.heads}
        # every query head of a streaming KV head streams, and only those
        assert set(rule.heads) == {kv * group + j for kv in kvs for j in range(group)}
        pairs |= {(layer, kv) for kv in kvs}
    return pairs


def write_tsv(path, gates):
    path.mkdir(parents=True, exist_ok=True)
    (path / "full_attention_heads.tsv").write_text("\n".join("\t".join(repr(g) for g in row) for row in gates) + "\n")
    return path


def llama3_gates():
    return [[float(x) for x in line.split("\t")] for line in (LLAMA3 / "full_attention_heads.tsv").read_text().splitlines()]


# ------------------------------------------------------------------ the published Llama-3 pattern

def test_llama3_1048k_at_sparsity_half_streams_128_of_256_kv_heads():
    spec = import_duo_attention(LLAMA3, query_heads=32, sparsity=0.5)
    gates = llama3_gates()
    assert duo_rule_counts(gates, 0.5) == {128}        # DuoAttention's own rule on its own file
    assert imported_kv_heads(spec, group=4) == sorted_selection(gates, 128)
    assert sum(len(r.heads) for r in spec.attention) == 128 * 4
    options = spec.meta["import"]["options"]
    assert (options["sparsity"], options["streaming_kv_heads"], options["total_kv_heads"]) == (0.5, 128, 256)
    assert "threshold" not in options
    # the training run's sizes from the config.json beside the TSV
    assert {(r.form.sink, r.form.window) for r in spec.attention} == {(128, 256)}


def test_llama3_1048k_threshold_half_streams_48():
    spec = import_duo_attention(LLAMA3, query_heads=32, threshold=0.5, sink=64, recent=256)
    gates = llama3_gates()
    expected = {(layer, kv) for layer, row in enumerate(gates) for kv, g in enumerate(row) if min(max(g, 0), 1) < 0.5}
    assert len(expected) == 48 and imported_kv_heads(spec, group=4) == expected
    assert {(r.form.sink, r.form.window) for r in spec.attention} == {(64, 256)}


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.3, 0.37, 0.5, 0.75, 0.9, 0.99, 1.0])
def test_llama3_1048k_counts_match_duo_rule(sparsity):
    gates = llama3_gates()
    spec = import_duo_attention(LLAMA3, query_heads=32, sparsity=sparsity)
    (expected,) = duo_rule_counts(gates, sparsity)      # one count whatever the noise
    pairs = imported_kv_heads(spec, group=4)
    assert len(pairs) == expected
    # 82 gates are exactly 1 after clipping and 18 exactly 0: the ties are broken by position
    assert pairs == sorted_selection(gates, expected)


# ------------------------------------------------------------------ ties and the rule itself

TIED = [[0.0, 1.0, 0.5, 0.5], [0.5, 0.5, 0.0, 1.0], [-0.2, 1.3, 0.5, 0.25]]   # 12 KV heads, many ties


@pytest.mark.parametrize("sparsity", [i / 20 for i in range(21)] + [1 / 3, 2 / 3, 0.41])
def test_ties_count_and_position_order(tmp_path, sparsity):
    spec = import_duo_attention(write_tsv(tmp_path, TIED), query_heads=8, sparsity=sparsity, sink=4, recent=8)
    counts = duo_rule_counts(TIED, sparsity)
    assert len(counts) == 1, counts                     # the noise only decides which tied head, not how many
    (expected,) = counts
    # by sorting: position (n - 1) * s, rounded up (exactly, here: n - 1 = 11 and s has few digits)
    by_sorting = 12 if sparsity >= 1 else math.ceil(11 * sparsity - 1e-12)
    assert expected == by_sorting
    assert imported_kv_heads(spec, group=2) == sorted_selection(TIED, expected)


def test_tie_break_is_by_layer_then_kv_head(tmp_path):
    # Six gates tied at 0.5: at sparsity 0.5 the quantile falls among them.
    gates = [[0.5, 0.5, 0.9], [0.1, 0.5, 0.5], [0.5, 0.5, 0.9]]
    spec = import_duo_attention(write_tsv(tmp_path, gates), query_heads=3, sparsity=0.5, sink=1, recent=2)
    (expected,) = duo_rule_counts(gates, 0.5)
    assert expected == 4
    assert imported_kv_heads(spec, group=1) == {(1, 0), (0, 0), (0, 1), (1, 1)}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -0.5, 1.5]) | st.floats(-0.5, 1.5), min_size=2,
                         max_size=2), min_size=1, max_size=12),
       st.floats(0, 1))
def test_count_is_one_duo_outcome(gates, sparsity):
    flat = sorted(min(max(g, 0.0), 1.0) for row in gates for g in row)
    assert streaming_count(flat, sparsity) in duo_rule_counts(gates, sparsity, seeds=range(8))


def test_streaming_count_rounding_residue():
    # (26 - 1) * 0.28 is 7.000000000000001 in floats: on tied gates the quantile stays on the
    # 7th gate (the residue times a noise-sized gap vanishes), so 7 heads stream, not 8.
    gates = [[0.5] * 26]
    assert (26 - 1) * 0.28 != 7
    assert streaming_count([0.5] * 26, 0.28) == 7 and duo_rule_counts(gates, 0.28) == {7}


# ------------------------------------------------------------------ options and errors

def test_both_rules_is_an_error():
    with pytest.raises(SpecError) as info:
        import_duo_attention(DATA / "duo", query_heads=4, threshold=0.5, sparsity=0.5)
    assert info.value.key == "threshold and sparsity" and "at most one of threshold" in info.value.allowed
    assert "sparsity (a number in [0, 1]" in info.value.allowed


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), True, "0.5"])
def test_bad_sparsity(value):
    with pytest.raises(SpecError) as info:
        import_duo_attention(DATA / "duo", query_heads=4, sparsity=value)
    assert info.value.key == "sparsity" and "a number in [0, 1]" in info.value.allowed


def test_neither_rule_warns_with_both_counts():
    with pytest.warns(SparseccWarning, match=r"threshold = 0.5 \(48 of 256 KV heads stream\).*sparsity = 0.5 \(128"):
        spec = import_duo_attention(LLAMA3, query_heads=32)
    assert spec.meta["import"]["options"]["threshold"] == 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_duo_attention(LLAMA3, query_heads=32, threshold=0.5)    # an explicit choice does not warn


def test_dispatcher_and_cli_take_sparsity(tmp_path, capsys):
    direct = import_duo_attention(LLAMA3, query_heads=32, sparsity=0.25, sink=64, recent=256)
    assert import_spec("duo-attention", LLAMA3, query_heads=32, sparsity=0.25, sink=64, recent=256) == direct
    out = tmp_path / "llama3.toml"
    argv = ["import", "duo_attention", str(LLAMA3), "--query-heads", "32", "--sparsity", "0.25", "--sink", "64",
            "--recent", "256", "-o", str(out)]
    assert cli.main(argv) == 0
    written = load_spec(str(out))
    assert written.attention == direct.attention and written.meta["import"]["options"]["streaming_kv_heads"] == 64
    assert cli.main(argv[:-2] + ["--threshold", "0.5", "-o", str(tmp_path / "x.toml")]) == cli.EXIT_SPEC_ERROR
    assert "--threshold and --sparsity are both given" in capsys.readouterr().err
