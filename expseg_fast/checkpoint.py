"""Checkpoints: what one holds, and saving and loading them safely.

A checkpoint is a dict of tensors and plain values (loaded with weights_only=True, so one carrying
arbitrary pickled objects is refused): the model's (the weights' moving average where the run kept one,
its trained weights then beside it), optimizer's and grad scaler's state dicts, the epoch it ends, the
best figure so far, the epoch that reached it and which figure it is, every random generator's state
(exact resume), the run's TrainConfig as JSON, the class names, the training data's
range, the data the run pinned (expseg_fast/data/identity.py) and its preprocessing plan, as JSON, and
its format. load_checkpoint brings a checkpoint of any earlier format to today's (upgrade: the one place
that knows what older ones lack; tests/fixtures/checkpoints holds one of each). It is serialised in
memory and then written atomically with plain file writes, so a full disk is reported as such
(NoSpaceError naming the file) and the previous checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import warnings
from pathlib import Path

import torch

from expseg_fast.atomic import write_bytes_atomic
from expseg_fast.config import INPUT_PATHS, VALIDATION, TrainConfig
from expseg_fast.data.identity import DataPin, PinnedSubjects
from expseg_fast.data.source import SYNTH
from expseg_fast.data.synth import packaged_composition

# What a checkpoint of every format holds (cuda_rng only when trained on CUDA, synth_rng for generator runs).
KEYS = ("model", "optimizer", "scaler", "epoch", "best", "aug_rng", "order_rng", "torch_rng", "config", "class_names")
# What each format added, oldest first; FORMAT (the index of the last) is what this code writes.
FORMATS = (
    "KEYS",
    "best_epoch; data_range (the training data's range, JSON)",
    "data_pin (the data the run pinned, JSON)",
    "plan (the preprocessing plan, JSON); synth_rng for generator runs",
    "best_by (the figure that chose best.pt); a generator run's data_range holds its label maps' composition",
    "format; inference_only in every checkpoint (before, only scripts/export_model.py's copies held it)",
    "a run with a moving average of its weights (ema_decay) keeps the average under model (what inference "
    "reads) and its trained weights under trained_model, with average_updates",
)
FORMAT = len(FORMATS) - 1
CURRENT_KEYS = (*KEYS, "best_epoch", "data_range", "data_pin", "plan", "best_by", "format", "inference_only")


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
    return upgrade(state, path)


def _format_of(state: dict) -> int:
    """The format of a checkpoint, read from what it holds where it predates the number."""
    if "format" in state:
        return int(state["format"])
    added = ("best_epoch", "data_pin", "plan", "best_by")  # the key each format up to 4 added first
    return sum(key in state for key in added)


def upgrade(state: dict, path: Path) -> dict:
    """The checkpoint `state` (loaded from path) in today's format, whatever format it was written in, with
    what an older one lacks stood in for as the code of its day read it: no best epoch (-1), no data range
    or data pin (null/None: not recorded), the plan its configuration implies, best.pt chosen by the run's
    own validation, a generator run's composition from all the packaged label maps (its split of them was
    not recorded). ValueError naming path for a format newer than this code's, or an unreadable one."""
    try:
        version = _format_of(state)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: its format number {state.get('format')!r} is not an integer") from None
    if version > FORMAT:
        raise ValueError(f"{path}: written in checkpoint format {version} by a newer expseg_fast (this one reads "
                         f"formats up to {FORMAT}); update expseg_fast to use it")
    state = dict(state)
    config = checkpoint_config(state, path) if version < 4 else None  # read once for the steps below
    if version < 1:
        state.update(best_epoch=-1, data_range="null")
    if version < 2:
        state["data_pin"] = None
    if version < 3:
        state["plan"] = json.dumps(config.plan().record())
    if version < 4:
        state["best_by"] = VALIDATION
        try:
            state["data_range"] = _with_composition(state, config)
        except (TypeError, ValueError, KeyError, RecursionError) as error:
            raise ValueError(f"{path}: its record of the training data's range is unreadable "
                             f"({type(error).__name__})") from None
    state.setdefault("inference_only", False)
    state["format"] = FORMAT
    return state


def _with_composition(state: dict, config: TrainConfig) -> str:
    """A checkpoint's data_range (JSON), with the packaged label maps' composition where a generator run's
    (config: its configuration) lacks one."""
    seen = json.loads(state["data_range"])
    if seen is not None and "composition" not in seen and config.data == SYNTH:
        seen["composition"] = packaged_composition(list(state["class_names"]))
    return json.dumps(seen)


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
    """The checkpoint loaded from path without its optimizer's and grad scaler's state and, where the run kept
    their moving average, its trained weights (all that segment.py and evaluate.py need, a third of the
    size); a run cannot resume from it. A copy to share: the paths of
    the machine it was trained on (output folder, data, label maps; in the configuration and the data pin)
    are cut to their last component, so it names its data without saying where they lay (evaluate.py then
    needs --data). ValueError naming path when its configuration or data pin is unreadable."""
    named = checkpoint_config(state, path).with_paths(lambda v: Path(v).name, ("out", *INPUT_PATHS))
    shared = {**state, "optimizer": {}, "scaler": {}, "inference_only": True, "config": named.to_json()}
    shared.pop("trained_model", None)  # only for resuming: model holds the weights inference uses
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
    """The data a checkpoint's run pinned, or None where it was not recorded (a checkpoint older than
    pinning); ValueError naming the file when it is unreadable."""
    if state["data_pin"] is None:
        return None
    try:
        return DataPin.from_json(state["data_pin"])
    except (TypeError, ValueError, KeyError, RecursionError) as error:
        raise ValueError(f"{path}: its record of the run's data is unreadable ({type(error).__name__})") from None
