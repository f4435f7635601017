"""Train the paper's network (or V-Net) with the exp-log loss family.

With no arguments: trains the network to segment real T1 brain scans on images drawn from 20 real
subjects' label maps (--data synth), into runs/synth: the `synth-cpu` preset on a CPU, `synth-paper` on a
GPU. With --data FOLDER (and --label-map), this machine's preset for the user's data: `cpu-bf16` on a CPU
that multiplies bf16 natively, `cpu` on other CPUs, `paper` on a GPU; `--preset cpu-bf16` (or `cpu`) with
no --data trains the synthetic demo dataset of earlier versions. The presets, their figures and every
default: expseg_fast/config.py. The options are TrainConfig's fields, with their documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from expseg_fast.checkpoint import checkpoint_config, load_checkpoint
from expseg_fast.config import PRESETS, RESUME_MAY_CHANGE, SYNTH, TrainConfig, main_preset, preset_precision
from expseg_fast.machine import torch_device
from expseg_fast.training import train
from expseg_fast.training.run_folder import RunError

_TYPES = {"int": int, "float": float, "str": str}


def option(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def parser(defaults: TrainConfig, preset: str) -> argparse.ArgumentParser:
    """One option per command-line field of TrainConfig: its name, type, choices and help."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    for f in TrainConfig.command_line_fields():
        kind, help_text = str(f.type), f.metadata["help"]
        kwargs: dict = {"default": getattr(defaults, f.name), "help": help_text}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind == "tuple[int, ...]":
            kwargs.update(type=int, nargs="+")
        else:
            kwargs["type"] = _TYPES[kind.split("|")[0].strip()]
        if f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        if f.name == "precision":  # the preset's, where it can train at --size
            kwargs.update(default=None, help=f"{help_text}; default: the {preset} preset's {defaults.precision} "
                                             f"(fp32 where that cannot train at --size)")
        p.add_argument(option(f), **kwargs)
    may_change = ", ".join("--" + name.replace("_", "-") for name in RESUME_MAY_CHANGE)
    p.add_argument("--resume", action="store_true",
                   help=f"continue from OUT/last.pt with the run's own configuration and pinned subjects (no "
                        f"--preset); only {may_change} may change (a moved --data/--label-map/--val-data/"
                        f"--val-label-map only with the same content; --val-data only where the run had one)")
    return p


def parse(argv=None) -> tuple[TrainConfig, bool]:
    device_type = torch_device("auto").type
    chosen = argparse.ArgumentParser(add_help=False)
    chosen.add_argument("--preset", choices=sorted(PRESETS))
    chosen.add_argument("--data")
    known = chosen.parse_known_args(argv)[0]
    preset = known.preset or main_preset(device_type == "cuda", own_data=known.data not in (None, SYNTH))
    p = parser(TrainConfig.for_preset(preset), preset)  # every default, from the preset
    p.add_argument("--preset", choices=sorted(PRESETS), default=preset,
                   help="the settings every default comes from (expseg_fast/config.py); default: the generator's "
                        "(synth-cpu, synth-paper on a GPU), or with --data FOLDER this machine's (cpu-bf16, cpu, "
                        "paper)")
    a = p.parse_args(argv)
    if a.resume:
        return _resumed(p, a, argv if argv is not None else sys.argv[1:]), True
    precision, note = (a.precision, None) if a.precision else preset_precision(preset, a.size, a.model, device_type)
    if note:
        print(f"note: {note}", file=sys.stderr)
    values = {f.name: getattr(a, f.name) for f in TrainConfig.command_line_fields()}
    config = TrainConfig.for_preset(preset, **{**values, "precision": precision,
                                               "fuse_levels": tuple(values["fuse_levels"])})
    try:
        config.check()
    except ValueError as error:
        p.error(str(error))
    return config, False


def _resumed(p: argparse.ArgumentParser, a: argparse.Namespace, argv: list[str]) -> TrainConfig:
    """The configuration saved in OUT/last.pt with the options given on this command line over it (the
    trainer refuses those a resumed run may not change, naming them)."""
    last = Path(a.out) / "last.pt"
    if not last.exists():
        p.error(f"--resume: {last} not found, so there is nothing to resume; check --out, or start a new run")
    try:
        config = checkpoint_config(load_checkpoint(last), last)
    except ValueError as error:
        sys.exit(f"error: {error}")
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    if "--preset" in given:
        p.error(f"--preset: a resumed run keeps the settings it was trained with ({last}); resume without "
                f"--preset, or start a new --out")
    for action in p._actions:
        if set(action.option_strings) & given and action.dest not in ("resume", "help"):
            value = getattr(a, action.dest)
            setattr(config, action.dest, tuple(value) if isinstance(value, list) else value)
    config.out = a.out
    return config


if __name__ == "__main__":
    cfg, resume = parse()
    try:
        train(cfg, resume=resume)
    except (ValueError, RunError) as error:  # bad data, checkpoint or folder, divergence, full disk: no traceback
        sys.exit(f"error: {error}")
