"""The epoch's validation: the hard Dice per label of each validation subject's label map, predicted by the
weights' moving average where the run keeps one (else the trained weights), on its training cube (the
paper's measure, background left out of the averages), gathered over the processes;
the same for the run's real check (Colin27, training/selection.py) where it has one; and the epoch's log
record."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from expseg_fast.data.preprocess import IGNORE
from expseg_fast.metrics import hard_dice, nanstd
from expseg_fast.models.forward import labels_at
from expseg_fast.training import distributed, selection

if TYPE_CHECKING:
    from expseg_fast.training.start import Run


def validate(run: Run) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Dice (subjects, C) of every validation subject, gathered; the prediction (1, D, H, W) of the
    first validation subject, for the overlay, where this process measured it)."""
    return _dice(run, run.pinned.val_source, run.pinned.val_idx, run.pinned.val_data.lacking)


def validate_real(run: Run) -> torch.Tensor | None:
    """Dice (1, C) of the run's real check (Colin27), gathered; None for a run without one."""
    if run.pinned.real_check is None:
        return None
    return _dice(run, run.pinned.real_check.source, [0], run.pinned.real_check.lacking)[0]


def _dice(run: Run, source, indices: list[int], lacking: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Dice (subjects, C) of these subjects of the source, each predicted once on its training cube and
    gathered over the processes, NaN for the classes their labels lack; the first one's prediction where
    this process measured it)."""
    model = run.training.evaluated
    model.eval()
    dice, first = [], None
    with torch.no_grad():
        for j in indices[run.place.rank::run.place.world]:
            image, labels = source.sample(j)
            pred = labels_at(model, image, run.dtype, run.memory_format)
            dice.append(hard_dice(pred, labels, len(run.pinned.names), IGNORE))
            if j == indices[0]:
                first = pred
    dice = torch.stack([d.cpu() for d in distributed.gather(dice)])
    dice[:, lacking] = float("nan")  # classes the labels do not have: not scored
    return dice, first


def epoch_record(run: Run, epoch: int, losses: list[float], steps: int, dice: torch.Tensor,
                 real: torch.Tensor | None = None) -> dict:
    """The epoch's line of log.jsonl (timings are added when the epoch is over); with the real check's
    Dice (1, C), its mean and per-label figures too, and which figure chose best.pt."""
    per_label = dice[:, 1:]  # without background, like the paper
    record = {
        "epoch": epoch,
        "train_loss": sum(losses) / len(losses),
        "train_steps": steps,
        "lr": run.config.lr_at(epoch),
        "val_dice_mean": float(per_label.nanmean()),
        "val_dice_per_label": [float(x) for x in per_label.nanmean(0)],
        "val_dice_std_per_label": [float(x) for x in nanstd(per_label)],
        "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30 if run.place.device.type == "cuda" else None,
    }
    if real is not None:
        record[selection.RECORD_KEYS[selection.COLIN27]] = float(real[:, 1:].nanmean())
        record["colin27_dice_per_label"] = [float(x) for x in real[0, 1:]]
        record["best_by"] = run.training.best_by
    return record
