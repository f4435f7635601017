"""A run's state on disk: what an epoch's checkpoint holds (expseg_fast/checkpoint.py says what every
checkpoint holds), writing last.pt and best.pt (and, with keep_checkpoints, one per epoch) after each
epoch, restoring a run from last.pt, and repairing what a kill between two writes left behind."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from expseg_fast.atomic import NoSpaceError
from expseg_fast.checkpoint import (
    FORMAT,
    checkpoint_config,
    load_checkpoint,
    non_finite_weights,
    save_checkpoint,
    to_bytes,
)
from expseg_fast.config import TrainConfig
from expseg_fast.runlog import append_record, read_log, rewrite_log
from expseg_fast.training.run_folder import RunError

if TYPE_CHECKING:
    from expseg_fast.training.start import Run


def check_resume(config: TrainConfig, state: dict, path: Path, main: bool) -> None:
    """A resumed run keeps its configuration: ValueError naming every setting that differs, except those
    it may take (RESUME_MAY_CHANGE), which are applied with a message. The channel count is the data's.
    An inference-only copy (checkpoint.for_inference) cannot be resumed."""
    if state["inference_only"]:
        raise ValueError(f"{path}: an inference-only copy without the optimizer's state; resume from the run's own "
                         f"last.pt")
    saved = checkpoint_config(state, path)
    refused, applied = dataclasses.replace(config, in_channels=saved.in_channels).resume_differences(saved)
    if refused:
        raise ValueError(f"{path}: a resumed run keeps the configuration it was trained with, and this one "
                         f"differs: {'; '.join(refused)}; resume with the run's settings, or start a new --out")
    if applied and main:
        print(f"resuming {path.parent} with {'; '.join(applied)}", flush=True)


def restore(run: Run, state: dict) -> None:
    """Puts the run where its last checkpoint left it (weights, optimizer, every generator), so that it
    continues exactly; drops log records of epochs it will redo and repairs best.pt."""
    training = run.training
    if training.average is not None:
        training.model.load_state_dict(state["trained_model"])
        training.average.restore(state["model"], state)
    else:
        training.model.load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scaler.load_state_dict(state["scaler"])
    training.aug_gen.set_state(state["aug_rng"])
    training.order_gen.set_state(state["order_rng"])
    torch.set_rng_state(state["torch_rng"])
    if run.place.device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"])
    run.pinned.train_source.set_state(state)
    training.start_epoch, training.best = int(state["epoch"]) + 1, float(state["best"])
    training.best_epoch = int(state["best_epoch"])
    if run.place.main:  # a kill between the log line and the checkpoint left a record the run will redo
        keep_log_before(run.place.out / "log.jsonl", training.start_epoch)
        repair_best(run.place.out, state)


def state_of(run: Run, epoch: int) -> dict:
    """What the checkpoint of an epoch holds: under `model` the weights inference uses (the moving average
    where the run keeps one, with the trained weights under `trained_model`)."""
    training, pinned = run.training, run.pinned
    state = {
        "model": training.evaluated.state_dict(), "optimizer": training.optimizer.state_dict(),
        "scaler": training.scaler.state_dict(), "epoch": epoch, "best": training.best,
        "best_epoch": training.best_epoch, "best_by": training.best_by, "aug_rng": training.aug_gen.get_state(),
        "order_rng": training.order_gen.get_state(), "torch_rng": torch.get_rng_state(),
        "config": run.config.to_json(), "class_names": list(pinned.names), "data_range": json.dumps(pinned.data_range),
        "data_pin": pinned.pin.to_json(), "plan": json.dumps(run.plan.record()), "inference_only": False,
        "format": FORMAT,
    }
    if run.place.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state()
    if training.average is not None:
        state.update(trained_model=training.model.state_dict(), **training.average.state())
    return {**state, **pinned.train_source.state()}


def check_weights(run: Run, epoch: int) -> None:
    """RunError when the weights are not finite: nothing of the epoch is saved (fp16 runs reach here when
    the grad scaler could not keep them finite)."""
    training = run.training
    bad = non_finite_weights(training.model.state_dict())
    if training.average is not None:
        bad += non_finite_weights(training.average.model.state_dict())
    if bad:
        raise RunError(f"epoch {epoch + 1}: the weights became non-finite ({bad[0]}, ...); nothing of this "
                       f"epoch was saved, {run.place.out / 'last.pt'} holds the last finite one; try a lower --lr")


@contextmanager
def full_disk_stops_the_run(out: Path) -> Iterator[None]:
    """A NoSpaceError inside becomes the RunError that says the previous checkpoint is intact."""
    try:
        yield
    except NoSpaceError as error:
        raise RunError(f"{error}; the previous checkpoint is intact ({out / 'last.pt'}): free some space "
                       f"and continue with --resume") from error


def save_epoch(run: Run, epoch: int, record: dict) -> None:
    """Appends the epoch's log record and writes last.pt, then best.pt when the epoch became the best
    (selection.update), and epoch_NNN.pt with keep_checkpoints (each atomically; NoSpaceError naming the
    file)."""
    append_record(run.place.out / "log.jsonl", record)
    blob = to_bytes(state_of(run, epoch))
    save_checkpoint(run.place.out / "last.pt", blob)  # first: a kill before best.pt is repaired on resume
    if run.training.best_epoch == epoch:
        save_checkpoint(run.place.out / "best.pt", blob)
    if run.config.keep_checkpoints:
        save_checkpoint(run.place.out / f"epoch_{epoch + 1:03d}.pt", blob)


def repair_best(out: Path, last: dict) -> None:
    """A kill between writing last.pt and best.pt leaves best.pt one improvement behind: copy last.pt."""
    best_epoch, epoch = int(last["best_epoch"]), int(last["epoch"])
    if best_epoch != epoch:
        return
    best = out / "best.pt"
    if best.exists() and int(load_checkpoint(best)["epoch"]) == epoch:
        return
    save_checkpoint(best, (out / "last.pt").read_bytes())
    print(f"{best}: brought up to date with {out / 'last.pt'} (epoch {epoch + 1}, the best so far)", flush=True)


def keep_log_before(path: Path, epoch: int) -> None:
    """Drops the records of epochs >= epoch (and a torn last line) from the log, atomically."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    kept = [r for r in read_log(path) if r["epoch"] < epoch]
    if len(kept) != len(lines):
        rewrite_log(path, kept)
