"""--keep-checkpoints and the collector of results' ablations.json (expseg_fast/experiments/ablations.py):
the JSON is built from the runs' logs, configurations and evaluations, never by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_dataset

from expseg_fast.config import TrainConfig
from expseg_fast.experiments import ablations
from expseg_fast.inference.evaluation import evaluate
from expseg_fast.runlog import read_log
from expseg_fast.training import train

SCRIPT = Path(__file__).parents[1] / "scripts" / "collect_ablations.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two runs: `long` (2 epochs, a checkpoint per epoch) and `short` (1 epoch, L_Dice)."""
    root = tmp_path_factory.mktemp("ablations")
    label_map = write_dataset(root / "data", 5)
    common = dict(data=str(root / "data"), label_map=str(label_map), size=16, width=4, deterministic=True, seed=2,
                  loader_workers=0)
    train(TrainConfig(out=str(root / "runs" / "long"), epochs=2, keep_checkpoints=True, **common))
    train(TrainConfig(out=str(root / "runs" / "short"), epochs=1, loss="log_dice", gamma_dice=1.0, **common))
    return root / "runs"


def test_keep_checkpoints_keeps_one_per_epoch(runs):
    assert sorted(p.name for p in (runs / "long").glob("epoch_*.pt")) == ["epoch_001.pt", "epoch_002.pt"]
    assert (runs / "long" / "epoch_002.pt").read_bytes() == (runs / "long" / "last.pt").read_bytes()
    assert not list((runs / "short").glob("epoch_*.pt"))


def test_the_collector_reads_logs_configurations_and_evaluations(runs):
    written = ablations.evaluate_runs(runs)
    assert sorted(p.relative_to(runs).as_posix() for p in written) == [
        "long/eval/epoch_1.json", "long/eval/epoch_2.json", "long/eval/last.json", "short/eval/last.json"]
    assert ablations.evaluate_runs(runs) == []  # scored once
    previous = {"machine": {"processor": "elsewhere"}, "labels": ["box", "ball"],
                "runs": {"old": {"average_last": 1.0}, "long": {"stale": True}},
                "evaluations": {"old/last": {"average": 2.0}, "long/epoch_9": {"stale": True}}}
    result = ablations.collect(runs, previous)
    assert set(result["runs"]) == {"old", "long", "short"} and result["runs"]["old"] == {"average_last": 1.0}
    assert set(result["evaluations"]) == {"old/last", "long/last", "long/epoch_1", "long/epoch_2", "short/last"}
    long, log = result["runs"]["long"], read_log(runs / "long" / "log.jsonl")
    assert long["per_label_last"] == [100 * v for v in log[-1]["val_dice_per_label"]]
    assert long["curve"] == [100 * float(np.nanmean(r["val_dice_per_label"])) for r in log]
    assert long["seconds"] == pytest.approx(sum(r["seconds"] for r in log)) and long["epochs_run"] == 2
    assert long["settings"]["size"] == 16 and result["runs"]["short"]["settings"]["loss"] == "log_dice"
    scored = evaluate(runs / "long" / "epoch_001.pt", device="cpu")
    per_label, average = scored.average(scored.original)
    assert result["evaluations"]["long/epoch_1"]["per_label"] == pytest.approx(list(per_label), nan_ok=True)
    assert long["original_grid_by_epoch"] == {"1": pytest.approx(average), "2": long["original_grid"]["average"]}
    assert result["labels"] == ["box", "ball"] and result["machine"] == {"processor": "elsewhere"}


def test_the_script_writes_the_json_and_names_a_bad_folder(runs, tmp_path):
    out = tmp_path / "ablations.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(runs), "--out", str(out), "--evaluate"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(out.read_text())["runs"]) == {"long", "short"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "not a folder of runs" in done.stderr and "Traceback" not in done.stderr
