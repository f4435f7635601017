"""Train the paper's network (or V-Net) with the exp-log loss family.

With no arguments: builds the synthetic demo dataset once and trains this machine's preset: `cpu-bf16`
(48^3, width 12, 32 epochs, bf16, channels-last) on a CPU that multiplies bf16 natively, `cpu` (48^3,
width 12, 12 epochs, fp32) on other CPUs (each about 4 minutes of training on 2 cores), or `paper`
(128^3, width 24, 100 epochs, bf16, channels-last) on a GPU; the presets are in expseg_fast/config.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from expseg_fast.checkpoint import checkpoint_config, load_checkpoint
from expseg_fast.config import LOSSES, MODELS, PRECISIONS, PREPROCESSINGS, TrainConfig, main_preset, preset_precision
from expseg_fast.machine import torch_device
from expseg_fast.run_folder import RunError
from expseg_fast.train import train


def parse(argv=None) -> tuple[TrainConfig, bool]:
    device_type = torch_device("auto").type
    preset = main_preset(device_type == "cuda")
    d = TrainConfig.for_preset(preset)  # every default, from the preset
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data", help="dataset folder (imagesTr/, labelsTr/) or .json/.csv list; default: the demo dataset")
    p.add_argument("--label-map", help="JSON label map (required with --data)")
    p.add_argument("--out", default=d.out, help="output folder")
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--size", type=int, default=d.size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--loss", choices=sorted(LOSSES), default=d.loss)
    p.add_argument("--gamma-dice", type=float, default=d.gamma_dice)
    p.add_argument("--gamma-cross", type=float, default=d.gamma_cross)
    p.add_argument("--w-dice", type=float, default=d.w_dice)
    p.add_argument("--w-cross", type=float, default=d.w_cross)
    p.add_argument("--eps", type=float, default=d.eps, help="Dice smoothing epsilon (the paper's 1)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help=f"default: the {preset} preset's {d.precision} (fp32 where that cannot train at --size)")
    p.add_argument("--preprocessing", choices=PREPROCESSINGS, default=d.preprocessing,
                   help="fit: the paper's (pad to a cube, resize to --size); spacing: voxels of --spacing-mm, the "
                        "--size cube cropped around the foreground (segment.py then slides windows over whole scans)")
    p.add_argument("--spacing-mm", type=float, default=d.spacing_mm, help="voxel size of --preprocessing spacing")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--split", type=int, default=d.split, help=f"which of the {d.splits} random 70/30 splits")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--limit-subjects", type=int, default=None, help="only the first N subjects (N >= 2)")
    p.add_argument("--max-voxels", type=int, default=d.max_voxels,
                   help="the most voxels a scan may have; larger ones are reported with the dataset's problems")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt with the run's own configuration and pinned subjects (--epochs, "
                        "--deterministic, --max-voxels and a moved --data/--label-map with the same content may "
                        "change; another differing option is an error)")
    a = p.parse_args(argv)
    if a.resume:
        return _resumed(p, a, argv if argv is not None else sys.argv[1:]), True
    precision, note = (a.precision, None) if a.precision else preset_precision(
        preset, a.size, a.model, device_type)
    if note:
        print(f"note: {note}", file=sys.stderr)
    config = TrainConfig.for_preset(
        preset, out=a.out, data=a.data, label_map=a.label_map, size=a.size, model=a.model, width=a.width,
        loss=a.loss, gamma_dice=a.gamma_dice, gamma_cross=a.gamma_cross, w_dice=a.w_dice, w_cross=a.w_cross, eps=a.eps,
        epochs=a.epochs, lr=a.lr, precision=precision, channels_last=a.channels_last, seed=a.seed, split=a.split,
        preprocessing=a.preprocessing, spacing_mm=a.spacing_mm,
        deterministic=a.deterministic, limit_subjects=a.limit_subjects, max_voxels=a.max_voxels,
    )
    try:
        config.check()
    except ValueError as error:
        p.error(str(error))
    return config, a.resume


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
    for action in p._actions:
        if set(action.option_strings) & given and action.dest not in ("resume", "help"):
            setattr(config, action.dest, getattr(a, action.dest))
    config.out = a.out
    return config


if __name__ == "__main__":
    cfg, resume = parse()
    try:
        train(cfg, resume=resume)
    except (ValueError, RunError) as error:  # bad data, checkpoint or folder, divergence, full disk: no traceback
        sys.exit(f"error: {error}")
