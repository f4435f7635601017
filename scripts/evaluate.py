"""Dice of a trained run on its validation subjects, on each scan's original grid (and the preprocessed one).

python scripts/evaluate.py CHECKPOINT [--data FOLDER --label-map JSON] [--device cpu|cuda] [--json FILE]
Scores the run's pinned validation subjects (a missing or changed one is an error); --data scores other
data on purpose (the run's training subjects left out) and says so. Its label map may follow another
protocol (FreeSurfer aseg, AAL): it names some of the model's classes ("unlisted": "ignore" leaves the
voxels of ids it does not list unscored); the model's classes it lacks are printed as not in the data,
never scored as 0. Prints one line per label (mean over
the subjects, %) and the average over labels; --json writes every figure (per subject too). Runs trained
at different sizes are compared on one grid this way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from expseg_fast.atomic import write_atomic
from expseg_fast.inference.evaluation import evaluate
from expseg_fast.inference.options import add_window_options, check_window_options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", help="score this dataset folder or list instead of the run's (its validation "
                                       "subjects found there by content, and subjects it never saw)")
    parser.add_argument("--label-map", help="its JSON label map (with --data)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="write every figure to this JSON file")
    add_window_options(parser)
    args = parser.parse_args()
    check_window_options(parser, args)
    try:
        result = evaluate(args.checkpoint, args.data, args.label_map, args.device, args.max_voxels, args.flip)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    original, average = result.average(result.original)
    resampled, average_resampled = result.average(result.resampled)
    print(f"{args.checkpoint}: epoch {result.epoch}, {len(result.subjects)} subjects; Dice %")
    print(f"data: {result.source}")
    print(f"{'label':<26}{'original grid':>14}{'preprocessed':>14}")
    for name, a, b in zip(result.names, original, resampled):
        if name in result.not_in_protocol:
            print(f"{name:<26}{'not in the data':>28}")
        else:
            print(f"{name:<26}{a:>14.1f}{b:>14.1f}")
    print(f"{'average':<26}{average:>14.2f}{average_resampled:>14.2f}")
    if args.json:  # after the table: a file that cannot be written loses no figure
        text = json.dumps(result.to_dict(), indent=1)
        try:
            write_atomic(Path(args.json), lambda tmp: Path(tmp).write_text(text), ".json")
        except OSError as error:
            sys.exit(f"error: --json {args.json}: not written ({error.strerror or error})")


if __name__ == "__main__":
    main()
