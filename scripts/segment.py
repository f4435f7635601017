"""Segment NIfTI or MGH files with a trained checkpoint: labels written in each input's original space and format.

python scripts/segment.py CHECKPOINT INPUT(.nii[.gz], .mgz, .mgh or folder) OUTPUT_FOLDER
                          [--device cpu|cuda] [--overwrite] [--volumes FILE.csv] [--qc FOLDER]
Every good input is segmented; the bad ones are listed at the end, one line each, and the exit status is
then 1. Outputs keep the input names; an existing one is replaced only with --overwrite, an input never.
--volumes: a row per scan (its file name, mm³ per class on its own grid, their total); --qc: a PNG per
scan (three orthogonal slices with the labels over them and a legend).
"""

from __future__ import annotations

import argparse
import sys

from expseg_fast.inference.files import segment
from expseg_fast.inference.options import add_window_options, check_window_options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("inputs", help="a .nii/.nii.gz/.mgz/.mgh file or a folder of them")
    parser.add_argument("out", help="output folder (label files keep the input names and formats)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")
    parser.add_argument("--volumes", default=None, metavar="FILE.csv",
                        help="write each scan's class volumes (mm³, on its own grid) and their total to this CSV")
    parser.add_argument("--qc", default=None, metavar="FOLDER",
                        help="write a PNG per scan to this folder: three slices with the labels and a legend")
    add_window_options(parser)
    args = parser.parse_args()
    check_window_options(parser, args)
    try:
        segment(args.checkpoint, args.inputs, args.out, args.device, args.overwrite, args.max_voxels, args.volumes,
                args.qc, args.flip)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
