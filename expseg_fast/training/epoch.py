"""One training epoch (the paper's strategy, section 2.3): NAdam steps (training/step.py) at the epoch's
scheduled learning rate (TrainConfig.lr_at) over this process's shard of the shuffled training split,
batch size 1, the rigid augmentation on the device, the weights' moving average (where kept) updated
after each step; a step whose loss or gradients are not finite stops the run before it can spoil the
weights. PhaseClock records where the epoch's seconds go."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from expseg_fast.data import augment
from expseg_fast.training.run_folder import RunError

if TYPE_CHECKING:
    from expseg_fast.training.start import Run


class PhaseClock:
    """Wall-clock seconds per phase of an epoch (data, augment, step, validation, report); on CUDA each
    lap waits for the queued kernels so that device time lands in the phase that launched it."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = {}
        self.started = self._last = time.perf_counter()

    def lap(self, phase: str) -> float:
        """Adds the time since the previous lap to `phase`; returns it."""
        self.sync()
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
        return elapsed


def train_epoch(run: Run, epoch: int, clock: PhaseClock) -> tuple[list[float], int]:
    """(the loss of every step, the steps of this process) of one epoch."""
    place, pinned, training = run.place, run.pinned, run.training
    training.model.train()
    training.step.set_lr(run.config.lr_at(epoch))
    order = [i for _ in range(pinned.train_source.repeats)
             for i in torch.randperm(len(pinned.train_idx), generator=training.order_gen).tolist()]
    shard = order[place.rank::place.world][: len(order) // place.world]  # equal shards: every process steps alike
    progress = place.main and sys.stderr.isatty()
    augmentation = run.config.augment_config()
    losses = []
    for step, (image, labels) in enumerate(pinned.train_source.epoch([pinned.train_idx[i] for i in shard]), start=1):
        if progress:
            _progress(epoch, step - 1, len(shard), clock.started)
        clock.lap("data")
        image, labels = augment(image, labels, training.aug_gen, augmentation)
        clock.lap("augment")
        value, finite = training.step(image, labels)
        if not finite:
            stop_diverged(value, epoch, step, place.out / "last.pt")
        if training.average is not None:
            training.average.update()
        losses.append(value)
        clock.lap("step")
    if progress:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    return losses, len(shard)


def _progress(epoch: int, done: int, total: int, started: float) -> None:
    """A progress bar with ETA on a terminal."""
    eta = f"{(time.perf_counter() - started) / done * (total - done):.0f} s" if done else "?"
    bar = "#" * (20 * done // total)
    print(f"\r  epoch {epoch + 1} [{bar:<20}] {done}/{total}  ETA {eta}", end="", file=sys.stderr)


def stop_diverged(value: float, epoch: int, step: int, last: Path) -> None:
    """The RunError of a step whose loss or gradients were not finite (the step did not spoil the weights)."""
    what = "the gradients" if math.isfinite(value) else "the loss"
    kept = f"{last} holds the last finite epoch" if last.exists() else "no checkpoint was written yet"
    raise RunError(f"epoch {epoch + 1}, step {step}: {what} became non-finite ({value:.4g}): the run diverged; "
                   f"{kept}; try a lower --lr")
