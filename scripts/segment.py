"""Segment NIfTI or MGH files with a trained checkpoint: labels written in each input's original space and format.

python scripts/segment.py CHECKPOINT INPUT(.nii[.gz], .mgz, .mgh or folder) OUTPUT_FOLDER [--device cpu|cuda] [--overwrite]
Every good input is segmented; the bad ones are listed at the end, one line each, and the exit status is
then 1. Outputs keep the input names; an existing one is replaced only with --overwrite, an input never.
"""

from __future__ import annotations

import argparse
import sys

from expseg_fast.inference.files import segment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("inputs", help="a .nii/.nii.gz/.mgz/.mgh file or a folder of them")
    parser.add_argument("out", help="output folder (label files keep the input names and formats)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (never an input)")
    parser.add_argument("--max-voxels", type=int, default=None,
                        help="the most voxels a scan (or its resampled grid) may have; default the checkpoint's")
    args = parser.parse_args()
    if args.max_voxels is not None and args.max_voxels < 1:
        parser.error(f"--max-voxels must be >= 1, got {args.max_voxels}")
    try:
        segment(args.checkpoint, args.inputs, args.out, args.device, args.overwrite, args.max_voxels)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
