"""The epoch's validation: the hard Dice per label of each validation subject's predicted label map on its
training cube (the paper's measure, background left out of the averages), gathered over the processes,
and the epoch's log record."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from expseg_fast.data.preprocess import IGNORE
from expseg_fast.metrics import hard_dice, nanstd
from expseg_fast.training import distributed

if TYPE_CHECKING:
    from expseg_fast.training.start import Run


def validate(run: Run) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Dice (subjects, C) of every validation subject, gathered; the prediction (1, D, H, W) of the
    first validation subject, for the overlay, where this process measured it)."""
    run.model.eval()
    dice, first = [], None
    with torch.no_grad(), torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32):
        for j in run.val_idx[run.rank::run.world]:
            image, labels = run.val_source.sample(j)
            pred = run.model(image.contiguous(memory_format=run.memory_format)).argmax(1)
            dice.append(hard_dice(pred, labels, run.num_labels, IGNORE))
            if j == run.val_idx[0]:
                first = pred
    dice = torch.stack([d.cpu() for d in distributed.gather(dice)])
    dice[:, run.val_data.lacking] = float("nan")  # classes the validation labels do not have: not scored
    return dice, first


def epoch_record(run: Run, epoch: int, losses: list[float], steps: int, dice: torch.Tensor) -> dict:
    """The epoch's line of log.jsonl (timings are added when the epoch is over)."""
    per_label = dice[:, 1:]  # without background, like the paper
    return {
        "epoch": epoch,
        "train_loss": sum(losses) / len(losses),
        "train_steps": steps,
        "lr": run.config.lr_at(epoch),
        "val_dice_mean": float(per_label.nanmean()),
        "val_dice_per_label": [float(x) for x in per_label.nanmean(0)],
        "val_dice_std_per_label": [float(x) for x in nanstd(per_label)],
        "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else None,
    }
