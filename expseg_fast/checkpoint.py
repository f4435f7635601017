"""Checkpoints: what one holds, and saving and loading them safely.

A checkpoint is a dict of tensors and plain values (loaded with weights_only=True, so one carrying
arbitrary pickled objects is refused): the model's, optimizer's and grad scaler's state dicts, the
epoch it ends and the best validation Dice so far, every random generator's state (exact resume),
the run's TrainConfig as JSON and the class names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from expseg_fast.atomic import write_atomic
from expseg_fast.config import TrainConfig

# What every checkpoint holds (cuda_rng only when trained on CUDA).
KEYS = ("model", "optimizer", "scaler", "epoch", "best", "aug_rng", "order_rng", "torch_rng", "config", "class_names")


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes state to path atomically (a crash leaves the previous file)."""
    write_atomic(path, lambda tmp: torch.save(state, tmp), ".pt")


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at path; ValueError naming the file when it cannot be loaded safely or lacks
    what a checkpoint holds."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a loadable expseg_fast checkpoint (refused: {error})") from error
    missing = [key for key in KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path}: not an expseg_fast checkpoint (missing {', '.join(missing)})")
    return state


def checkpoint_config(state: dict, path: Path) -> TrainConfig:
    """The TrainConfig a loaded checkpoint was trained with; ValueError naming the file if unreadable."""
    try:
        return TrainConfig.from_json(state["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: its stored configuration is unreadable ({error})") from error
