"""The real-scan results table (expseg_fast/experiments/real_scans.py): per class and model, the Dice on
the scans' own grid, a class the model lacks or the labels lack said as such, never a 0."""

from __future__ import annotations

import json

from expseg_fast.experiments.real_scans import table


def test_the_table_says_what_is_not_scored_and_averages_what_is(tmp_path):
    a = {"labels": ["grey", "white", "CVL I-V"], "not_in_protocol": ["white"],
         "original": {"per_label": [80.0, float("nan"), 40.0], "average": 60.0}}
    b = {"labels": ["grey", "white", "ventral DC"], "not_in_protocol": ["white", "ventral DC"],
         "original": {"per_label": [75.5, float("nan"), float("nan")], "average": 75.5}}
    for name, content in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    lines = table({"demo/colin27": tmp_path / "a.json", "synth/colin27": tmp_path / "b.json"}).splitlines()
    assert lines[0] == "| class | demo/colin27 | synth/colin27 |"
    assert "| grey | 80.0 | 75.5 |" in lines and "| white | not in the labels | not in the labels |" in lines
    assert "| CVL I-V | 40.0 | not a class of the model |" in lines
    assert "| ventral DC | not a class of the model | not in the labels |" in lines
    assert lines[-1] == "| **average of the scored classes** | **60.0** | **75.5** |"
