"""Reproduce the paper's Table 1(b) and Fig. 3 on the synthetic demo dataset: seven cases x k splits.

Runs every missing (case, split) under --runs (resuming interrupted ones, skipping complete ones), then
writes table1.md, table1.json and fig3.png to --results. Presets: `cpu` (32^3, widths 12/8, 32 epochs,
5 splits: about 2.5 hours on 2 cores), `paper` (128^3, widths 24/16, 100 epochs, bf16, for a GPU) and
`smoke` (one epoch of two subjects: the GPU suite's CI rehearsal). Several processes may train different
cases of the same --runs at once (the GPU suite does): --prepare-only builds the data and the cache first,
--train-only leaves the results to one final --collect-only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from expseg_fast.config import PRESETS
from expseg_fast.experiments import table1, table1_run
from expseg_fast.training.run_folder import RunError


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", help="folder of the runs (default: runs/table1-PRESET)")
    p.add_argument("--results", help="folder of the results (default: results/table1-PRESET)")
    p.add_argument("--cases", nargs="+", choices=[c.key for c in table1.CASES], help="only these cases")
    p.add_argument("--splits", type=int, nargs="+", help="only these split indices")
    p.add_argument("--collect-only", action="store_true", help="write the results from the runs so far, train nothing")
    p.add_argument("--train-only", action="store_true", help="train, write no results")
    p.add_argument("--prepare-only", action="store_true", help="build the demo dataset and the cache, train nothing")
    p.add_argument("--partial", action="store_true", help="results include incomplete runs (each says its epochs)")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset].table1
    if a.splits and not all(0 <= s < preset.splits for s in a.splits):
        p.error(f"--splits: indices must be in [0, {preset.splits})")
    runs = Path(a.runs or f"runs/table1-{a.preset}")
    results = Path(a.results or f"results/table1-{a.preset}")
    cases = [c for c in table1.CASES if not a.cases or c.key in a.cases]
    started = time.perf_counter()
    if a.prepare_only:
        table1.label_voxels(preset, runs)
        return
    if not a.collect_only:
        print(f"[table1] preset {a.preset}: {preset}; {len(cases)} cases; runs in {runs}, results in {results}",
              flush=True)
        try:
            table1_run.run_all(preset, runs, cases, a.splits)
        except (ValueError, RunError) as error:
            sys.exit(f"error: {error}")
        if a.train_only:
            return
    earlier = results / "table1.json"  # its splits stay where runs/ lacks them (runs/ is not committed)
    previous = json.loads(earlier.read_text()) if earlier.exists() else None
    result = table1.collect(preset, runs, partial=a.partial, previous=previous)
    result["label_voxels"] = table1.label_voxels(preset, runs)
    table1.write_results(result, a.preset, preset, results, None if a.collect_only else time.perf_counter() - started)
    print(f"[table1] results: {results / 'table1.md'}, {results / 'table1.json'}, {results / 'fig3.png'}", flush=True)


if __name__ == "__main__":
    main()
