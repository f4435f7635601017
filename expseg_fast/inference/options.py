"""The command-line options that segment.py and evaluate.py share (how each scan is windowed), defined and
checked in one place."""

from __future__ import annotations

import argparse

from expseg_fast.config import PREDICTOR


def add_window_options(parser: argparse.ArgumentParser) -> None:
    """--flip / --no-flip (the predictor's default) and --max-voxels (default: the checkpoint's)."""
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=PREDICTOR.flip,
                        help="average each window with its left-right mirror (twice the time; default %(default)s)")
    parser.add_argument("--max-voxels", type=int, default=None,
                        help="the most voxels a scan (or its resampled grid) may have; default the checkpoint's")


def check_window_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line through parser.error for a --max-voxels below 1."""
    if args.max_voxels is not None and args.max_voxels < 1:
        parser.error(f"--max-voxels must be >= 1, got {args.max_voxels}")
