"""Write an inference-only copy of a checkpoint: the weights and everything segment.py and evaluate.py read,
without the optimizer's state (a third of the size; a run cannot resume from it). A checkpoint that
segment.py would refuse (non-finite weights, weights or class names that do not fit its configuration,
a broken stored plan) is refused here too, and nothing is written.

python scripts/export_model.py CHECKPOINT OUT.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from expseg_fast.checkpoint import for_inference, load_checkpoint, save_checkpoint
from expseg_fast.inference.files import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.out.exists() and args.out.resolve() == args.checkpoint.resolve():
        parser.error(f"{args.out}: is the checkpoint itself; choose another file")
    try:
        load_model(args.checkpoint, torch.device("cpu"))  # what segment.py refuses is refused here, nothing written
        save_checkpoint(args.out, for_inference(load_checkpoint(args.checkpoint), args.checkpoint))
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
