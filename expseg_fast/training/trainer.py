"""The trainer: the paper's training strategy (section 2.3), resumable, on one device or several.

`train(config)` runs a TrainConfig (expseg_fast/config.py): `start` sets the run up (start.py), then per
epoch one pass over the shuffled training split (epoch.py), the validation hard Dice per label
(validation.py; also on Colin27 for a generator run: selection.py says which figure chooses best.pt), one
JSON line in log.jsonl with the seconds spent in each phase, the plots (dice_curve.png, overlay.png) and
dice_table.md refreshed (reports.py), and the `last` and `best` checkpoints written atomically
(run_state.py). Every random draw comes from torch generators whose states are checkpointed, so a
resumed run continues exactly (bitwise in deterministic mode on the CPU). Under torchrun each process
trains on its shard of every epoch (DistributedDataParallel), validation is gathered, and only the first
process writes.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from expseg_fast.config import TrainConfig
from expseg_fast.training import distributed, run_state, selection
from expseg_fast.training.epoch import PhaseClock, train_epoch
from expseg_fast.training.run_folder import RunFolder
from expseg_fast.training.start import Run, start
from expseg_fast.training.validation import epoch_record, validate, validate_real


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Runs (or, with resume, continues) the training; returns the last epoch's record. The process's
    deterministic-algorithms and cuDNN-autotuning settings are restored on return."""
    deterministic, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    folder = RunFolder(Path(config.out))
    try:
        run = start(config, resume, folder)
        place, pinned, c = run.place, run.pinned, run.config
        if place.main:
            print(f"training {c.model} on {len(pinned.train_idx)} subjects, validating on {len(pinned.val_idx)}, "
                  f"{c.size}^3, {c.epochs} epochs, {c.loss} loss, {c.precision} on {place.device} x {place.world}; "
                  f"output in {place.out}", flush=True)
            print(selection.describe(c, run.training.best_by, pinned.real_check, pinned.names), flush=True)
        record: dict = {}
        for epoch in range(run.training.start_epoch, run.config.epochs):
            record = run_epoch(run, epoch)
        distributed.teardown()
        if run.place.main:
            _say_done(run.place.out, bool(record))
        return record
    finally:
        folder.close()
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark


def run_epoch(run: Run, epoch: int) -> dict:
    """Trains, validates and (on the first process) records and checkpoints one epoch; its record."""
    place, pinned, training = run.place, run.pinned, run.training
    clock = PhaseClock(place.device)
    if place.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, steps = train_epoch(run, epoch, clock)
    dice, first_prediction = validate(run)
    record = epoch_record(run, epoch, distributed.gather(losses), steps, dice, validate_real(run))
    clock.lap("validation")
    selection.update(run.config, training, record, epoch)
    if not place.main:
        return record
    training.history.append(record)
    run_state.check_weights(run, epoch)
    with run_state.full_disk_stops_the_run(place.out):
        from expseg_fast.training import reports  # matplotlib: loaded when the first epoch is over

        reports.write_reports(place.out, pinned.names, pinned.val_source.sample(pinned.val_idx[0]), first_prediction,
                              training.history)
        clock.lap("report")
        record["phase_seconds"] = clock.seconds
        record["seconds"] = time.perf_counter() - clock.started
        run_state.save_epoch(run, epoch, record)
    eta = record["seconds"] * (run.config.epochs - epoch - 1)
    real = f"  {pinned.real_check.name} {record['colin27_dice_mean']:.3f}" if pinned.real_check else ""
    print(f"epoch {epoch + 1}/{run.config.epochs}  loss {record['train_loss']:.4f}  val Dice "
          f"{record['val_dice_mean']:.3f}{real}  {record['seconds']:.1f} s  ETA {eta / 60:.1f} min", flush=True)
    return record


def _say_done(out: Path, trained: bool) -> None:
    if trained:
        print((out / "dice_table.md").read_text())
    print(f"done: log {out / 'log.jsonl'}, checkpoints {out / 'last.pt'} and {out / 'best.pt'}, plots "
          f"{out / 'dice_curve.png'} and {out / 'overlay.png'}, table {out / 'dice_table.md'}", flush=True)
