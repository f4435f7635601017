"""The GPU suite's `real_scans` part: the label-map generator's preset trained within a deadline, then
scored on real scans. The run lives in a fixed folder of the machine's temporary directory, so a second
call on the same (warm) machine resumes it exactly; what does not finish is labelled partial. Its best.pt
and last.pt are scored by scripts/real_scans.py on Colin27/AAL and on any --data set (Dice per class on
each scan's own grid). Writes STAGE/real_scans.md (epochs, training seconds, the table, the epoch
profile) and STAGE/real-scans/ (every evaluation's JSON, the run's log).

python -m bench.real_scans_run --preset synth-paper --seconds 300 --stage DIR [--run DIR] [--device cuda]
       [--colin27 FOLDER] [--data NAME=FOLDER=MAP ...] [--score-seconds 60] [--train-only] [-- TRAIN.PY OPTIONS]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.epoch_profile import markdown, profile
from expseg_fast.checkpoint import load_checkpoint
from expseg_fast.config import TrainConfig
from expseg_fast.data import anatomy
from expseg_fast.runlog import read_log

ROOT = Path(__file__).parents[1]


def train_until(command: list[str], seconds: float, log: Path) -> str:
    """Runs command (its output to log) for at most seconds; then stops it and everything it started.
    Returns how it ended: "finished", "stopped at the deadline" or "failed (exit N)"."""
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            code = process.wait(timeout=max(seconds, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # the trainer writes checkpoints atomically: the last one stays
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return "stopped at the deadline"
    return "finished" if code == 0 else f"failed (exit {code})"


def report(run: Path, records: list[dict], ended: str, train_s: float, table: str) -> str:
    """Markdown: the run's epochs (records: its log's; of its schedule, partial where short), training
    seconds, the real-scan table and the epoch profile."""
    config = TrainConfig.from_json(load_checkpoint(run / "last.pt")["config"])
    best = load_checkpoint(run / "best.pt")["epoch"] if (run / "best.pt").exists() else None
    partial = "" if len(records) >= config.epochs else " — PARTIAL: the schedule did not finish"
    lines = [f"## The generator's preset on real scans (`{config.data}`, {config.size}^3 at {config.spacing_mm} mm, "
             f"width {config.width}, {config.norm} norm, {config.lr_schedule} rate)", "",
             f"| epochs run, of {config.epochs} | best.pt epoch | training this call | ended |", "|---|---|---|---|",
             f"| {len(records)}{partial} | {best} | {train_s:.0f} s | {ended} |", "",
             "Mean Dice (%) per class on REAL scans, each on its own grid (scripts/real_scans.py):", "", table]
    if records:
        lines += ["", markdown({run.name: profile(records)})]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="synth-paper")
    parser.add_argument("--seconds", type=float, required=True, help="the part's whole time, scoring included")
    parser.add_argument("--stage", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="the run's folder (default: expseg-real-scans-PRESET in the "
                                                 "temporary directory; resumed where it holds a run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--colin27", type=Path, default=anatomy.COLIN27)
    parser.add_argument("--data", action="append", default=[], help="another labelled set: NAME=FOLDER=MAP")
    parser.add_argument("--score-seconds", type=float, default=60, help="kept from the training for the scoring")
    parser.add_argument("--train-only", action="store_true", help="train until the deadline, score nothing (a later "
                        "call resumes the run and scores it)")
    parser.add_argument("train_options", nargs="*", help="further scripts/train.py options (after --)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.seconds
    run = args.run or Path(tempfile.gettempdir()) / f"expseg-real-scans-{args.preset}"
    resume = ["--resume"] if (run / "last.pt").exists() else []
    out = args.stage / "real-scans"
    out.mkdir(parents=True, exist_ok=True)
    preset = [] if resume else ["--preset", args.preset]  # a resumed run keeps its own settings
    command = [sys.executable, "scripts/train.py", *preset, "--out", str(run),
               "--device", args.device, *args.train_options, *resume]
    began = time.monotonic()
    ended = train_until(command, deadline - began - args.score_seconds, out / "train.log")
    train_s = time.monotonic() - began
    print(f"training {ended} after {train_s:.0f} s", flush=True)
    if not (run / "best.pt").exists():
        sys.exit(f"error: {run / 'best.pt'}: no epoch finished in {train_s:.0f} s ({out / 'train.log'} says why)")
    if args.train_only:
        sys.exit(1 if ended.startswith("failed") else 0)
    models = [f"generator-{args.preset}={run / 'best.pt'}", f"generator-{args.preset}-last={run / 'last.pt'}"]
    score = [sys.executable, "scripts/real_scans.py", *(f"--model={m}" for m in models), "--out", str(out),
             "--device", args.device, "--colin27", str(args.colin27), *(f"--data={d}" for d in args.data)]
    done = subprocess.run(score, cwd=ROOT, capture_output=True, text=True, timeout=max(deadline - time.monotonic(), 30))
    if done.returncode != 0:
        sys.exit(f"error: scoring failed: {done.stderr.strip()[-500:]}")
    shutil.copy(run / "log.jsonl", out / "train-log.jsonl")
    records = read_log(run / "log.jsonl")
    text = report(run, records, ended, train_s, (out / "table.md").read_text())
    (args.stage / "real_scans.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"ended": ended, "train_seconds": train_s,
                                                  "epochs_run": len(records)}, indent=1))
    print(text, end="")
    if ended.startswith("failed"):
        sys.exit(1)


if __name__ == "__main__":
    main()
