"""Train the paper's network (or V-Net) with the exp-log loss family.

With no arguments: builds the synthetic demo dataset once and trains the CPU preset (48^3, width 12,
12 epochs, about a minute per epoch on 2 cores) on a CPU, or the paper's setting (128^3, width 24,
100 epochs, bf16, channels-last) on a GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

from expseg_fast.train import LOSSES, TrainConfig, train


def parse(argv=None) -> tuple[TrainConfig, bool]:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset folder (imagesTr/, labelsTr/) or .json/.csv list; default: the demo dataset")
    p.add_argument("--label-map", help="JSON label map (required with --data)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--model", choices=["ours", "vnet"], default="ours")
    p.add_argument("--width", type=int, default=24 if gpu else 12)
    p.add_argument("--size", type=int, default=128 if gpu else 48)
    p.add_argument("--epochs", type=int, default=100 if gpu else 12)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", choices=sorted(LOSSES), default="exp")
    p.add_argument("--gamma-dice", type=float, default=0.3)
    p.add_argument("--gamma-cross", type=float, default=0.3)
    p.add_argument("--w-dice", type=float, default=0.8)
    p.add_argument("--w-cross", type=float, default=0.2)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16" if gpu else "fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=gpu)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", type=int, default=0, help="which of the 5 random 70/30 splits")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--limit-subjects", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    a = p.parse_args(argv)
    config = TrainConfig(
        out=a.out, data=a.data, label_map=a.label_map, demo_preset="paper" if gpu else "cpu", size=a.size,
        model=a.model, width=a.width, loss=a.loss, gamma_dice=a.gamma_dice, gamma_cross=a.gamma_cross,
        w_dice=a.w_dice, w_cross=a.w_cross, epochs=a.epochs, lr=a.lr, precision=a.precision,
        channels_last=a.channels_last, seed=a.seed, split=a.split, deterministic=a.deterministic,
        limit_subjects=a.limit_subjects,
    )
    try:
        config.check()
    except ValueError as error:
        p.error(str(error))
    return config, a.resume


if __name__ == "__main__":
    cfg, resume = parse()
    try:
        train(cfg, resume=resume)
    except ValueError as error:  # bad data or checkpoint: a clear message, no traceback
        sys.exit(f"error: {error}")
