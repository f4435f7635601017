"""Where a training epoch's time goes, from trainer logs (log.jsonl): data, augmentation, step,
validation and report seconds per epoch, the first epoch (cuDNN autotuning, kernel loading) apart.

python -m bench.epoch_profile RUN/log.jsonl [...] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PHASES = ("data", "augment", "step", "validation", "report")


def profile(records: list[dict]) -> dict:
    """First-epoch seconds, and per later epoch (or the first, if alone) the median seconds of each
    phase and the milliseconds per training step."""
    later = records[1:] or records
    row = {"epochs": len(records), "first_epoch_s": records[0]["seconds"],
           "epoch_s": statistics.median(r["seconds"] for r in later)}
    for phase in PHASES:
        row[phase] = statistics.median(r["phase_seconds"][phase] for r in later)
    row["ms_per_step"] = 1e3 * statistics.median(
        (r["phase_seconds"]["data"] + r["phase_seconds"]["augment"] + r["phase_seconds"]["step"]) / r["train_steps"]
        for r in later)
    return row


def markdown(rows: dict[str, dict]) -> str:
    lines = ["Epoch profile (median over the epochs after the first; seconds per epoch)", "",
             "| run | epochs | first epoch s | epoch s | " + " | ".join(PHASES) + " | ms per training step |",
             "|---|---|---|---|" + "---|" * len(PHASES) + "---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['epochs']} | {r['first_epoch_s']:.1f} | {r['epoch_s']:.2f} | "
                     + " | ".join(f"{r[p]:.2f}" for p in PHASES) + f" | {r['ms_per_step']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = {}
    for path in args.logs:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        if records:
            rows[path.stem if path.name != "log.jsonl" else path.parent.name] = profile(records)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
