"""The real-scan results table (expseg_fast/experiments/real_scans.py): per class and model, the Dice on
the scans' own grid, a class the model lacks or the labels lack said as such, never a 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from expseg_fast.data import anatomy
from expseg_fast.data.anatomy import PROTOCOLS
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


@pytest.mark.skipif(not (anatomy.COLIN27 / "aal.nii.gz").exists(), reason="Colin27 needs Debian's mricron-data")
def test_the_committed_model_scores_on_colin27_what_the_committed_results_say(tmp_path):
    """results/real-scans/model.pt (the documented command's model, instance norm) evaluated afresh on
    Colin27 gives the per-class Dice its committed JSON holds (the same code on the same scan: to 0.005, for
    bf16 rounding on another processor)."""
    from expseg_fast.checkpoint import checkpoint_config, load_checkpoint
    from expseg_fast.inference.evaluation import evaluate

    model = Path(__file__).parents[1] / "results" / "real-scans" / "model.pt"
    assert checkpoint_config(load_checkpoint(model), model).norm == "instance"
    committed = json.loads((model.parent / "generator-exp-colin27.json").read_text())["original"]["per_subject"][0]
    got = evaluate(model, str(anatomy.colin27_dataset(tmp_path / "colin27")), str(PROTOCOLS / "aal.json"),
                   device="cpu").original[0].tolist()
    assert len(got) == len(committed) and sum(not math.isnan(v) for v in committed) == 8  # AAL's 8 classes
    for mine, theirs in zip(got, committed):
        assert math.isnan(mine) == math.isnan(theirs)
        assert math.isnan(theirs) or mine == pytest.approx(theirs, abs=0.005)  # Dice as a fraction
