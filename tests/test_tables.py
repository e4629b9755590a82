"""docs/results.md's generated tables are what docs/tables.py prints from docs/data."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs"))
import tables  # noqa: E402 (docs/tables.py)


def results():
    with open(tables.RESULTS) as f:
        return f.read()


def test_every_generated_table_in_results_md_is_printed_from_its_json():
    text = results()
    assert len(tables.BLOCK.findall(text)) >= 3
    assert tables.regenerate(text) == text, "run python docs/tables.py, or mend the JSON"


def test_a_number_typed_over_or_a_changed_json_value_is_told_apart(monkeypatch):
    text = results()
    typed = text.replace("| method=bgpo | 5 | 46.1 +- 2.0 |", "| method=bgpo | 5 | 46.2 +- 2.0 |")
    assert typed != text and tables.regenerate(typed) == text
    real = tables.read

    def moved(name):  # seed 0's last evaluation of bgpo at 3 tokens, one point up
        data = real(name)
        if name == "offpolicy_len3.json":
            data["runs"]["method=bgpo"]["0"]["acc"][-1][1] += 0.01
        return data

    monkeypatch.setattr(tables, "read", moved)
    assert tables.regenerate(text) != text
