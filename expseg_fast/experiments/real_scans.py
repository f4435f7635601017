"""Models scored on real scans whose labels follow another protocol (results/real-scans/): each model's
checkpoint evaluated on each dataset through a protocol map (expseg_fast/data/anatomy/protocols/),
the evaluations written as evaluate.py's JSON, and one table of the per-class Dice (mean over the
dataset's scans, on each scan's own grid) with the classes a protocol lacks marked as such."""

from __future__ import annotations

import json
import math
from pathlib import Path

from expseg_fast.atomic import write_atomic


def evaluate_all(models: dict[str, Path], datasets: dict[str, tuple[Path, dict[str, Path]]], out: Path,
                 device: str = "cpu") -> dict[str, Path]:
    """Evaluates every model on every dataset: datasets maps a name to (folder, {model name: protocol
    map}); writes out/MODEL-DATASET.json, which name the checkpoint by its file name and the dataset by its
    name (no path of this machine: they are committed); returns them by "MODEL/DATASET"."""
    from expseg_fast.inference.evaluation import evaluate

    written = {}
    for model, checkpoint in models.items():
        for name, (folder, protocols) in datasets.items():
            record = evaluate(checkpoint, str(folder), str(protocols[model]), device=device).to_dict()
            record["checkpoint"] = Path(checkpoint).name
            for spelling in {str(folder), str(Path(folder).resolve())}:
                record["source"] = record["source"].replace(spelling, name)
            path = out / f"{model}-{name}.json"
            text = json.dumps(record, indent=1)
            write_atomic(path, lambda tmp: Path(tmp).write_text(text), ".json")
            written[f"{model}/{name}"] = path
    return written


def table(evaluations: dict[str, Path]) -> str:
    """Markdown: one row per class, one column per "MODEL/DATASET" evaluation (Dice %, own grid), the
    average over the classes each one scores last."""
    results = {key: json.loads(path.read_text()) for key, path in evaluations.items()}
    classes = list(dict.fromkeys(name for r in results.values() for name in r["labels"]))
    lines = ["| class | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for name in classes:
        cells = []
        for r in results.values():
            if name not in r["labels"]:
                cells.append("not a class of the model")
            elif name in r["not_in_protocol"]:
                cells.append("not in the labels")
            else:
                value = r["original"]["per_label"][r["labels"].index(name)]
                cells.append("–" if not math.isfinite(value) else f"{value:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **average of the scored classes** | "
                 + " | ".join(f"**{r['original']['average']:.1f}**" for r in results.values()) + " |")
    return "\n".join(lines) + "\n"
