"""One training epoch (the paper's strategy, section 2.3): NAdam steps over this process's shard of the
shuffled training split, batch size 1, the rigid augmentation on the device, the fused loss; a step
whose loss or gradients are not finite stops the run before it can spoil the weights. PhaseClock
records where the epoch's seconds go."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from expseg_fast.data import augment
from expseg_fast.losses import loss as loss_fn
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
    run.model.train()
    order = torch.randperm(len(run.train_idx), generator=run.order_gen).tolist()
    shard = order[run.rank::run.world][: len(order) // run.world]  # equal shards: every process steps alike
    run.sampler.order = [run.train_idx[i] for i in shard]
    progress = run.main and sys.stderr.isatty()
    losses = []
    for step, (image, labels) in enumerate(run.loader, start=1):
        if progress:
            _progress(epoch, step - 1, len(shard), clock.started)
        image, labels = run.on_device(image, labels)
        clock.lap("data")
        image, labels = augment(image, labels, run.aug_gen, run.augment)
        clock.lap("augment")
        losses.append(_step(run, image, labels, epoch, step))
        clock.lap("step")
    if progress:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    return losses, len(shard)


def _step(run: Run, image: torch.Tensor, labels: torch.Tensor, epoch: int, step: int) -> float:
    """One optimizer step on one (augmented) subject; its loss."""
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32):
        logits = run.net(image.contiguous(memory_format=run.memory_format))
    value = loss_fn(logits, labels, run.weights, run.spec, validate=False)
    run.scaler.scale(value).backward()
    if not run.scaler.is_enabled():  # fp16: the scaler skips steps with non-finite gradients itself
        stop_if_diverged(value, run.model, epoch, step, run.out / "last.pt")
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return float(value.detach())


def _progress(epoch: int, done: int, total: int, started: float) -> None:
    """A progress bar with ETA on a terminal."""
    eta = f"{(time.perf_counter() - started) / done * (total - done):.0f} s" if done else "?"
    bar = "#" * (20 * done // total)
    print(f"\r  epoch {epoch + 1} [{bar:<20}] {done}/{total}  ETA {eta}", end="", file=sys.stderr)


def stop_if_diverged(value: torch.Tensor, model: torch.nn.Module, epoch: int, step: int, last: Path) -> None:
    """RunError when the loss or the gradients are not finite, before the optimizer step can spoil the weights."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    value = value.detach()
    finite = torch.isfinite(value) & torch.isfinite(norm)
    if not bool(finite):
        what = "the loss" if not bool(torch.isfinite(value)) else "the gradients"
        kept = f"{last} holds the last finite epoch" if last.exists() else "no checkpoint was written yet"
        raise RunError(f"epoch {epoch + 1}, step {step}: {what} became non-finite ({float(value):.4g}): the run "
                       f"diverged; {kept}; try a lower --lr")
