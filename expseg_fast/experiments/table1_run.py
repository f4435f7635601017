"""Runs the Table 1 experiment (expseg_fast/table1.py describes and reads it): every missing
(case, split) is trained, resumed when interrupted, skipped when its log holds every epoch."""

from __future__ import annotations

from pathlib import Path

from expseg_fast.config import Table1Settings
from expseg_fast.experiments.table1 import CASES, config_for, is_complete, run_dir
from expseg_fast.training import train


def run_all(preset: Table1Settings, runs: Path, cases=CASES, splits: range | None = None) -> None:
    """Runs every missing (case, split), split by split so that an interrupted experiment has whole splits."""
    for split in splits if splits is not None else range(preset.splits):
        for case in cases:
            path = run_dir(runs, case, split)
            if is_complete(path, preset.epochs):
                print(f"[table1] {case.key} split {split}: complete, skipped", flush=True)
                continue
            resume = (path / "last.pt").exists()
            print(f"[table1] {case.key} split {split}: {'resuming' if resume else 'starting'}", flush=True)
            train(config_for(case, split, preset, runs), resume=resume)
