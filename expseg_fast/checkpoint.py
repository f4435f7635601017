"""Checkpoints: what one holds, and saving and loading them safely.

A checkpoint is a dict of tensors and plain values (loaded with weights_only=True, so one carrying
arbitrary pickled objects is refused): the model's, optimizer's and grad scaler's state dicts, the
epoch it ends, the best validation Dice so far and the epoch that reached it, every random
generator's state (exact resume), the run's TrainConfig as JSON and the class names. It is serialised
in memory and then written atomically with plain file writes, so a full disk is reported as such
(NoSpaceError naming the file) and the previous checkpoint stays.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from expseg_fast.atomic import write_bytes_atomic
from expseg_fast.config import TrainConfig

# What every checkpoint holds (cuda_rng only when trained on CUDA).
KEYS = ("model", "optimizer", "scaler", "epoch", "best", "aug_rng", "order_rng", "torch_rng", "config", "class_names")


def to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_checkpoint(path: Path, state: dict | bytes) -> None:
    """Writes a state (or its to_bytes) to path atomically (a crash or a full disk leaves the previous file)."""
    write_bytes_atomic(path, state if isinstance(state, bytes) else to_bytes(state))


def non_finite_weights(model_state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or Inf."""
    return [name for name, t in model_state.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at path; ValueError naming the file when it cannot be loaded safely or lacks
    what a checkpoint holds."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a loadable expseg_fast checkpoint (refused: {_reason(error)})") from error
    missing = [key for key in KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path}: not an expseg_fast checkpoint (missing {', '.join(missing)})")
    return state


def _reason(error: Exception) -> str:
    """One line of why torch.load refused a file: the safe loader's own reason, not its lines of advice."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(\. |\.?$)", text, re.MULTILINE)
    if found:
        return f"{found.group(1)}; a checkpoint holds only tensors and plain values"
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def checkpoint_config(state: dict, path: Path) -> TrainConfig:
    """The TrainConfig a loaded checkpoint was trained with; ValueError naming the file if unreadable."""
    try:
        return TrainConfig.from_json(state["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: its stored configuration is unreadable ({error})") from error
