"""Collect the ablation runs' figures into one JSON (results/table1-cpu/ablations.json, section by section
in its ablations.md): nothing in results/ is compiled by hand.

python scripts/collect_ablations.py RUNS [--out results/table1-cpu/ablations.json] [--evaluate] [--device cpu]
RUNS holds one folder per run (scripts/train.py --out RUNS/NAME, --keep-checkpoints where single epochs
are wanted). --evaluate first scores every checkpoint not yet scored on the scans' own grid
(RUNS/NAME/eval/*.json, evaluate.py's JSON). Runs of the existing --out that RUNS lacks are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from expseg_fast.experiments import ablations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results/table1-cpu/ablations.json"))
    parser.add_argument("--evaluate", action="store_true", help="score the checkpoints not yet scored first")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not args.runs.is_dir():
        parser.error(f"{args.runs}: not a folder of runs")
    try:
        if args.evaluate:
            for path in ablations.evaluate_runs(args.runs, args.device):
                print(f"scored: {path}", flush=True)
        previous = json.loads(args.out.read_text()) if args.out.exists() else None
        result = ablations.collect(args.runs, previous)
        ablations.write(result, args.out)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    print(f"{args.out}: {len(result['runs'])} runs, {len(result['evaluations'])} evaluations", flush=True)


if __name__ == "__main__":
    main()
