"""Checkpoints: what one holds, and saving and loading them safely.

A checkpoint is a dict of tensors and plain values (loaded with weights_only=True, so one carrying
arbitrary pickled objects is refused): the model's, optimizer's and grad scaler's state dicts, the
epoch it ends, the best validation Dice so far and the epoch that reached it, every random
generator's state (exact resume), the run's TrainConfig as JSON, the class names and the data the run
pinned (expseg_fast/data/identity.py, as JSON; absent from checkpoints older than that). It is serialised
in memory and then written atomically with plain file writes, so a full disk is reported as such
(NoSpaceError naming the file) and the previous checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import io
import re
import warnings
from pathlib import Path

import torch

from expseg_fast.atomic import write_bytes_atomic
from expseg_fast.config import INPUT_PATHS, TrainConfig
from expseg_fast.data.identity import DataPin, PinnedSubjects

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
        with warnings.catch_warnings():  # torch's advice on pickle protocols and TorchScript is not for this file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a loadable expseg_fast checkpoint (refused: {_reason(error)})") from error
    missing = [key for key in KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path}: not an expseg_fast checkpoint (missing {', '.join(missing)})")
    return state


def _reason(error: Exception) -> str:
    """One line of why torch.load refused a file: the safe loader's own reason, never its advice to load
    the file unsafely (weights_only=False runs whatever code the file holds)."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(\. |\.?$)", text, re.MULTILINE)
    if found:
        return f"{found.group(1)}; a checkpoint holds only tensors and plain values"
    if "TorchScript" in text:
        return "a TorchScript archive, not a checkpoint"
    if "hasRecord" in text or "PytorchStreamReader" in text:
        return "a damaged checkpoint archive (a file cut short or edited)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    if "weights_only" in first or not re.search(r"[a-z]{3,} [a-z]{3,}", first):  # advice, or an opaque code like '101'
        return f"not a PyTorch checkpoint file, or a truncated one ({type(error).__name__})"
    return first


def for_inference(state: dict, path: Path) -> dict:
    """The checkpoint loaded from path without its optimizer's and grad scaler's state (all that segment.py
    and evaluate.py need, a third of the size); a run cannot resume from it. A copy to share: the paths of
    the machine it was trained on (output folder, data, label maps; in the configuration and the data pin)
    are cut to their last component, so it names its data without saying where they lay (evaluate.py then
    needs --data). ValueError naming path when its configuration or data pin is unreadable."""
    named = checkpoint_config(state, path).with_paths(lambda v: Path(v).name, ("out", *INPUT_PATHS))
    shared = {**state, "optimizer": {}, "scaler": {}, "inference_only": True, "config": named.to_json()}
    pin = checkpoint_pin(state, path)
    if pin is not None:
        shared["data_pin"] = dataclasses.replace(pin, train=_named(pin.train), val=_named(pin.val)).to_json()
    return shared


def _named(side: PinnedSubjects) -> PinnedSubjects:
    """side with its root and label map file cut to their names."""
    label_map_file = Path(side.label_map_file).name if side.label_map_file else None
    return dataclasses.replace(side, root=Path(side.root).name, label_map_file=label_map_file)


def checkpoint_config(state: dict, path: Path) -> TrainConfig:
    """The TrainConfig a loaded checkpoint was trained with, checked like the command line's; ValueError
    naming the file when it is unreadable or out of range (a hand-edited checkpoint)."""
    try:
        config = TrainConfig.from_json(state["config"])
        config.check()
    except RecursionError:
        raise ValueError(f"{path}: its stored configuration is unreadable (nested too deeply)") from None
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: its stored configuration is unreadable or invalid ({error})") from error
    return config


def checkpoint_pin(state: dict, path: Path) -> DataPin | None:
    """The data a checkpoint's run pinned, or None for a checkpoint older than pinning; ValueError
    naming the file when it is unreadable."""
    if "data_pin" not in state:
        return None
    try:
        return DataPin.from_json(state["data_pin"])
    except (TypeError, ValueError, KeyError, RecursionError) as error:
        raise ValueError(f"{path}: its record of the run's data is unreadable ({type(error).__name__})") from None
