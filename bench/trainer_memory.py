"""Peak anonymous memory of the trainer process against the number of subjects (README: "the trainer's
memory does not grow with the number of subjects").

Usage: python -m bench.trainer_memory FOLDER [--size 96] [--subjects 12 120] [--width 4] [--source-size S]
Writes SUBJECTS random subjects of SIZE³ (or S³: fit mode resizes them to SIZE³ all the same)
(imagesTr/labelsTr and labels.json, float32 images, 4 classes) under FOLDER once, trains
`scripts/train.py --size SIZE --width W --epochs 1` (fit mode) on the first N of them in a fresh run
folder (with a fresh cache beside it, so every subject is prepared), samples the trainer's RssAnon
(/proc/PID/status; its worker processes are not counted) every 20 ms, and prints one JSON line per N:
the peak and the peak while preparing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.cpu_memory import status_kib
from expseg_fast.data import save_volume

ROOT = Path(__file__).parents[1]


def write_subjects(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """n subjects of size³ in the imagesTr/labelsTr layout: 4 classes in blobs, a noisy image of them."""
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    axes = np.meshgrid(*[np.linspace(-1, 1, size, dtype=np.float32)] * 3, indexing="ij")
    for i in range(n):
        image, label = folder / "imagesTr" / f"case{i:04d}_0000.nii.gz", folder / "labelsTr" / f"case{i:04d}.nii.gz"
        if image.exists() and label.exists():
            continue
        rng = np.random.default_rng([seed, i])  # each subject its own: more of them never repeat one
        centre = rng.uniform(-0.2, 0.2, 3)
        radius = np.sqrt(sum((a - c) ** 2 for a, c in zip(axes, centre)))
        labels = np.digitize(radius, [0.25, 0.45, 0.7]).astype(np.uint8)
        labels = np.where(radius < 0.7, 3 - labels, 0).astype(np.uint8)
        values = (labels * 100.0 + rng.normal(scale=20.0, size=labels.shape)).astype(np.float32)
        save_volume(image, values, np.eye(4))
        save_volume(label, labels, np.eye(4))
    names = ("background", "outer", "middle", "inner")
    (folder / "labels.json").write_text(json.dumps({"classes": [{"name": n, "ids": [i]} for i, n in enumerate(names)]}))


def peak(data: Path, out: Path, subjects: int, size: int, width: int) -> dict:
    """Trains once; the trainer's peak RssAnon (MiB) overall and up to the end of preparation."""
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--data", str(data), "--label-map",
           str(data / "labels.json"), "--size", str(size), "--width", str(width), "--epochs", "1",
           "--preprocessing", "fit", "--limit-subjects", str(subjects), "--out", str(out)]
    log = open(out.with_suffix(".log"), "w")
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    samples: list[tuple[float, int]] = []
    prepared: list[float] = []

    def sample() -> None:
        while child.poll() is None:
            try:
                samples.append((time.monotonic(), status_kib("RssAnon", child.pid)))
            except (OSError, RuntimeError):  # the process has ended
                break
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for line in child.stdout:
        log.write(line)
        if line.startswith("prepared ") and not prepared:
            prepared.append(time.monotonic())
    child.wait()
    thread.join()
    log.close()
    if child.returncode != 0:
        raise RuntimeError(f"train.py failed ({child.returncode}): see {out.with_suffix('.log')}")
    cut = prepared[0] if prepared else float("inf")
    return {"subjects": subjects, "size": size, "peak_mib": max(k for _, k in samples) / 1024,
            "peak_preparing_mib": max((k for t, k in samples if t <= cut), default=0) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--subjects", type=int, nargs="+", default=[12, 120])
    parser.add_argument("--source-size", type=int, help="the subjects' own size (default: --size)")
    args = parser.parse_args()
    source = args.source_size or args.size
    data = args.folder / f"data{source}"
    write_subjects(data, max(args.subjects), source)
    for n in args.subjects:
        out = args.folder / f"m{time.time_ns()}" / f"run{args.size}-{n}"  # its own cache: prepared anew
        out.parent.mkdir(parents=True)
        print(json.dumps(peak(data, out, n, args.size, args.width)), flush=True)


if __name__ == "__main__":
    main()
