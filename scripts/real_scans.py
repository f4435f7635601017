"""Score trained models on real scans: Colin27 with its manual AAL labels (Debian's mricron-data), and any
other labelled scans, each through a protocol map; writes every evaluation (evaluate.py's JSON) and one
table to --out (results/real-scans/ holds the committed ones).

python scripts/real_scans.py --model NAME=CHECKPOINT [...] [--data NAME=FOLDER=MAP ...] [--out DIR] [--device cpu]
                             [--colin27 FOLDER]
Colin27's map is chosen by the model's classes: the paper's vermal groups (the atlas demo's models) take
protocols/aal_vermis.json, FreeSurfer-trained models (--data synth) protocols/aal.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from expseg_fast.atomic import write_atomic
from expseg_fast.checkpoint import load_checkpoint
from expseg_fast.data import anatomy
from expseg_fast.experiments import real_scans


def pair(text: str, parts: int) -> list[str]:
    values = text.split("=")
    if len(values) != parts or not all(values):
        raise argparse.ArgumentTypeError(f"expected {'='.join(['NAME', 'PATH', 'MAP'][:parts])}, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=lambda t: pair(t, 2), action="append", required=True)
    parser.add_argument("--data", type=lambda t: pair(t, 3), action="append", default=[],
                        help="another labelled dataset: NAME=FOLDER=PROTOCOL_MAP (one map for every model)")
    parser.add_argument("--out", type=Path, default=Path("results/real-scans"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--colin27", type=Path, default=anatomy.COLIN27,
                        help="the folder of mricron-data's ch2bet.nii.gz and aal.nii.gz (default: the package's)")
    args = parser.parse_args()
    models = {name: Path(path) for name, path in args.model}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            colin27 = anatomy.colin27_dataset(Path(scratch) / "colin27", args.colin27)
            aal = {name: anatomy.PROTOCOLS / ("aal_vermis.json" if "CVL I-V" in load_checkpoint(path)["class_names"]
                                              else "aal.json") for name, path in models.items()}
            datasets = {"colin27": (colin27, aal)}
            datasets.update({name: (Path(folder), {m: Path(protocol) for m in models})
                             for name, folder, protocol in args.data})
            written = real_scans.evaluate_all(models, datasets, args.out, args.device)
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    text = real_scans.table(written)
    write_atomic(args.out / "table.md", lambda tmp: Path(tmp).write_text(text), ".md")
    print(text, end="")
    print(f"torch {torch.__version__}; evaluations and table in {args.out}", flush=True)


if __name__ == "__main__":
    main()
