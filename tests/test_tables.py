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


def test_collect_upto_cuts_each_run_after_the_step(tmp_path):
    """--collect NAME DIRS --upto STEP: the run as it stood after STEP, its seconds and time
    split from metrics.jsonl (the step's own evaluation included in both)."""
    import json
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"seed": 0, "method": "bgpo"}))
    records = [dict(step=s, seconds=10.0 * s, time_rollout=1.0, time_loss=2.0, time_update=0.5,
                    updates=[{}, {"gap": 0.1 * s, "abs_d": 0.01, "clipped": 0.0}])
               for s in (1, 2, 3)]
    records[1].update(acc=0.5, time_eval=3.0)
    records[2].update(acc=0.6, time_eval=3.0)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps(dict(steps=3, seconds=33.0, time_split=dict(
        rollout=3.0, loss=6.0, update=1.5, eval=6.0))))
    whole, = tables.load_runs([str(run)])["all"].values()
    cut, = tables.load_runs([str(run)], upto=2)["all"].values()
    assert whole["steps"] == 3 and whole["acc"] == [[2, 0.5], [3, 0.6]]
    assert cut["steps"] == 2 and cut["acc"] == [[2, 0.5]] and cut["seconds"] == 23.0
    assert cut["time_split"] == dict(rollout=2.0, loss=4.0, update=1.0, eval=3.0)
    assert [step for step, _ in cut["gap"]] == [1, 2]
