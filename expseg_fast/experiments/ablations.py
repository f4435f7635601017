"""The collector of the ablation runs' figures (results/table1-cpu/ablations.json): nothing in results/ is
compiled by hand.

An ablation is a folder of runs (RUNS/NAME/, each trained with scripts/train.py, with --keep-checkpoints
where the figures of single epochs are wanted). `evaluate_runs` scores each run's last.pt and
epoch_NNN.pt on the scans' own grid with expseg_fast.inference.evaluation, once, into
RUNS/NAME/eval/last.json and eval/epoch_NNN.json (evaluate.py's JSON); `collect` reads the logs, the
configurations and those evaluations into one dict: per run its settings, the per-label Dice of its last
epoch on the training grid (%), its curve and seconds, and its evaluations; per evaluation
"NAME/last" or "NAME/epoch_N" the scans'-own-grid figures. Runs of an earlier ablations.json that the
folder lacks (runs/ is not committed) are kept.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path

import torch

from expseg_fast.atomic import write_atomic
from expseg_fast.checkpoint import checkpoint_config, load_checkpoint
from expseg_fast.machine import processor_name
from expseg_fast.runlog import read_log

SETTINGS = ("model", "size", "width", "epochs", "loss", "gamma_dice", "gamma_cross", "w_dice", "w_cross", "eps",
            "split", "seed", "precision", "channels_last")


def checkpoints(run: Path) -> dict[str, Path]:
    """{"last": last.pt, "epoch_N": epoch_NNN.pt, ...} of a run folder."""
    found = {"last": run / "last.pt"} if (run / "last.pt").exists() else {}
    for path in sorted(run.glob("epoch_*.pt")):
        found[f"epoch_{int(path.stem.split('_')[1])}"] = path
    return found


def evaluate_runs(runs: Path, device: str = "cpu") -> list[Path]:
    """Scores every checkpoint of every run under runs/ that has no evaluation yet (RUN/eval/NAME.json,
    evaluate.py's JSON); returns the files written."""
    from expseg_fast.inference.evaluation import evaluate

    written = []
    for run in sorted(p for p in runs.iterdir() if (p / "log.jsonl").exists()):
        for name, checkpoint in checkpoints(run).items():
            target = run / "eval" / f"{name}.json"
            if target.exists() and target.stat().st_mtime >= checkpoint.stat().st_mtime:
                continue
            text = json.dumps(evaluate(checkpoint, device=device).to_dict(), indent=1)
            write_atomic(target, lambda tmp: Path(tmp).write_text(text), ".json")
            written.append(target)
    return written


def _average(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _evaluation(path: Path) -> dict:
    """The figures of one evaluate.py JSON: epoch, average and per-label Dice on the scans' own grid (%),
    and the average on the training grid."""
    e = json.loads(path.read_text())
    return {"epoch": e["epoch"], "average": e["original"]["average"], "per_label": e["original"]["per_label"],
            "resampled_average": e["resampled"]["average"]}


def run_figures(run: Path) -> tuple[dict, dict[str, dict]]:
    """(the run's entry, its evaluations by name) of one run folder."""
    records = read_log(run / "log.jsonl", warn=False)
    state = load_checkpoint(run / "last.pt")
    config = checkpoint_config(state, run / "last.pt")
    per_label = [100 * v for v in records[-1]["val_dice_per_label"]]
    seconds = [r["seconds"] for r in records]
    entry = {"settings": {k: getattr(config, k) for k in SETTINGS}, "labels": list(state["class_names"][1:]),
             "machine": processor_name(), "epochs_run": len(records),
             "per_label_last": per_label, "average_last": _average(per_label),
             "curve": [100 * _average(r["val_dice_per_label"]) for r in records], "seconds": sum(seconds),
             "epoch_seconds": seconds, "median_epoch_seconds": statistics.median(seconds)}
    evaluations = {name: _evaluation(run / "eval" / f"{name}.json") for name in checkpoints(run)
                   if (run / "eval" / f"{name}.json").exists()}
    if "last" in evaluations:
        entry["original_grid"] = evaluations["last"]
    by_epoch = {name.split("_")[1]: e["average"] for name, e in evaluations.items() if name != "last"}
    if by_epoch:
        entry["original_grid_by_epoch"] = dict(sorted(by_epoch.items(), key=lambda item: int(item[0])))
    return entry, {f"{run.name}/{name}": e for name, e in evaluations.items()}


def collect(runs: Path, previous: dict | None = None) -> dict:
    """Every run under runs/ (a folder with log.jsonl and last.pt) with its evaluations (each run says
    the machine that collected it, where it was trained), and the runs of `previous` (an earlier
    ablations.json) that runs/ lacks, with their evaluations and machine. ValueError when the runs'
    classes differ."""
    result = {"machine": {"processor": processor_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "platform": platform.platform()},
              "labels": None, "runs": {}, "evaluations": {}}
    if previous:
        result.update(machine=previous["machine"], labels=previous["labels"])
        result["runs"].update(previous["runs"])
        result["evaluations"].update(previous["evaluations"])
    for run in sorted(p for p in runs.iterdir() if (p / "log.jsonl").exists() and (p / "last.pt").exists()):
        entry, evaluations = run_figures(run)
        labels = entry.pop("labels")
        if result["labels"] is not None and labels != result["labels"]:
            raise ValueError(f"{run}: its classes {labels} are not the ablations' {result['labels']}")
        result["labels"] = labels
        result["runs"][run.name] = entry
        result["evaluations"] = {k: v for k, v in result["evaluations"].items() if not k.startswith(run.name + "/")}
        result["evaluations"].update(evaluations)
    return result


def write(result: dict, path: Path) -> None:
    text = json.dumps(result, indent=1)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text), ".json")
