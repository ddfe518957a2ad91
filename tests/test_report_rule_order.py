"""Rule names in the report are listed by kind, then by index as a number (attention[9] before attention[10])."""

from sparsecc.report import Report
from sparsecc.report.model import rule_sort_key


def unmatched_report():
    report = Report()
    # Inserted in text order, as a merge of reports may leave them.
    for key in sorted([f"attention[{i}]" for i in range(12)] + ["linear[2]", "linear[10]", "ffn[0]"]):
        report.rules[key] = (key.split("[")[0], f"m{key}")
    report.matched_rules = ["attention[3]"]
    return report


def test_unmatched_rules_sort_numerically():
    report = unmatched_report()
    expected = [f"attention[{i}]" for i in range(12) if i != 3] + ["ffn[0]", "linear[2]", "linear[10]"]
    assert [entry.split(" ")[0] for entry in report.unmatched_rules()] == expected
    assert [w.split(" ")[0] for w in report.warnings] == expected
    summary = report.summary()
    assert summary.index("attention[9] ") < summary.index("attention[10] ") < summary.index("linear[2] ")


def test_rule_sort_key():
    keys = ["linear[1]", "attention[10]", "attention[9]", "ffn[2]", "note"]
    assert sorted(keys, key=rule_sort_key) == ["attention[9]", "attention[10]", "ffn[2]", "linear[1]", "note"]
