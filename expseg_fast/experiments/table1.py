"""The paper's Table 1(b) and Fig. 3 experiment: seven (network, loss) cases x k random 70/30 splits.

This module describes the runs and reads them: each (case, split) is one training run in
RUNS/<case>-split<k>/ (expseg_fast/table1_run.py runs the missing ones); `collect` reads their logs;
`write_results` writes table1.md (ours beside the paper's numbers), table1.json (every figure) and
fig3.png (validation Dice vs epoch, mean over splits). It does not import the trainer.

Statistics as the paper: per split, the hard Dice of each validation image, averaged over the images
(per label) at the LAST epoch; then mean ± std over the splits. The average is over the 19 labels.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from expseg_fast import runlog
from expseg_fast.atomic import write_atomic
from expseg_fast.config import Table1Settings, TrainConfig
from expseg_fast.data import preprocess_pair
from expseg_fast.data.demo import CLASS_NAMES, PAPER_SIZES
from expseg_fast.data.plans import FitPlan
from expseg_fast.data.source import DataLocation, open_dataset
from expseg_fast.machine import processor_name


@dataclass(frozen=True)
class Case:
    """One row group of Table 1(b): a network and a loss (L_Exp with LossSpec's weights, the paper's)."""

    key: str
    title: str
    model: str
    loss: str
    gamma: float = 1.0


CASES = (
    Case("linear_dice", "linear Dice E[1 - Dice_i]", "ours", "linear_dice"),
    Case("log_dice_g1", "L_Dice(γ=1)", "ours", "log_dice", 1.0),
    Case("cross_g1", "L_Cross(γ=1)", "ours", "cross", 1.0),
    Case("exp_g1", "L_Exp(γ=1)", "ours", "exp", 1.0),
    Case("exp_g2", "L_Exp(γ=2)", "ours", "exp", 2.0),
    Case("exp_g0.3", "L_Exp(γ=0.3)", "ours", "exp", 0.3),
    Case("vnet_exp_g0.3", "V-Net, L_Exp(γ=0.3)", "vnet", "exp", 0.3),
)


# Paper Table 1(b): per case, (mean, std) % for labels 1..19, then the average.
PAPER = {
    "linear_dice": ("87±1 47±38 32±40 72±36 50±41 30±37 31±38 0±0 0±0 34±42 88±1 86±1 88±1 32±39 0±0 54±44 0±0 "
                    "51±42 35±43", "43±11"),
    "log_dice_g1": ("84±1 61±30 83±2 90±1 81±2 73±2 78±2 68±2 74±2 85±1 87±1 85±1 88±1 79±2 59±3 89±1 79±1 86±2 "
                    "88±1", "80±2"),
    "cross_g1": ("87±1 56±5 79±3 86±2 76±3 67±2 73±6 59±4 65±4 83±2 87±2 85±1 89±1 75±3 54±6 89±1 76±3 84±1 86±1",
                 "77±2"),
    "exp_g1": ("87±2 78±3 84±1 90±1 82±1 74±2 78±3 68±3 75±1 83±3 87±1 86±0 89±1 80±1 64±1 90±1 80±2 86±2 88±1",
               "81±1"),
    "exp_g2": ("79±7 61±15 74±6 75±10 67±12 62±8 66±10 52±17 56±15 64±12 78±8 78±7 84±4 64±11 46±10 77±10 60±16 "
               "67±15 67±15", "67±11"),
    "exp_g0.3": ("88±1 77±2 84±1 91±1 82±1 74±1 78±2 69±2 75±2 86±1 89±1 86±1 89±0 81±1 62±5 91±1 80±1 87±1 89±1",
                 "82±1"),
    "vnet_exp_g0.3": ("84±2 67±7 80±4 87±4 78±3 67±5 73±6 59±7 65±5 72±5 85±2 82±4 86±2 72±7 48±8 82±6 70±7 75±6 "
                      "78±6", "74±4"),
}


def paper_numbers(key: str) -> dict:
    """The paper's figures for one case: {"labels": [(mean, std)] * 19, "average": (mean, std)}, in %."""
    labels, average = PAPER[key]
    parse = lambda text: tuple(float(x) for x in text.split("±"))  # noqa: E731
    return {"labels": [parse(x) for x in labels.split()], "average": parse(average)}


def run_dir(runs: Path, case: Case, split: int) -> Path:
    """Every run shares runs/ as parent, hence one demo dataset and one preprocessing cache."""
    return runs / f"{case.key}-split{split}"


def config_for(case: Case, split: int, preset: Table1Settings, runs: Path) -> TrainConfig:
    return TrainConfig(
        out=str(run_dir(runs, case, split)), demo_preset=preset.demo, size=preset.size, model=case.model,
        width=preset.width_vnet if case.model == "vnet" else preset.width_ours, loss=case.loss,
        gamma_dice=case.gamma, gamma_cross=case.gamma, epochs=preset.epochs,
        precision=preset.precision, channels_last=preset.channels_last, seed=0, splits=preset.splits, split=split,
        limit_subjects=preset.subjects,
    )


def read_log(path: Path) -> list[dict]:
    """The epoch records of the run in folder path (empty when it has not started)."""
    return runlog.read_log(path / "log.jsonl", warn=False)


def is_complete(path: Path, epochs: int) -> bool:
    records = read_log(path)
    return len(records) == epochs and records[-1]["epoch"] == epochs - 1


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (n - 1, 0 for one value) of the finite values; NaN when none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1) if len(finite) > 1 else 0.0
    return mean, math.sqrt(var)


def _label_average(per_label: list[float]) -> float:
    finite = [v for v in per_label if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def label_voxels(preset: Table1Settings, runs: Path) -> list[float]:
    """Mean voxel count of labels 1..19 per subject at the preset's training size (from the runs' cache)."""
    config = config_for(CASES[0], 0, preset, runs)
    demo_data = DataLocation(None, None, config.demo_settings(), config.demo_preset, runs)
    data = open_dataset(demo_data, config.limit_subjects)
    pairs, label_map = data.pairs, data.label_map
    totals = [0.0] * (len(CLASS_NAMES) - 1)
    for pair in pairs:
        sample = preprocess_pair(pair, label_map, FitPlan(preset.size), runs / "cache", mmap=True)
        labels = torch.from_numpy(sample.labels.astype("int64"))
        counts = torch.bincount(labels.reshape(-1), minlength=len(CLASS_NAMES))[1:]
        totals = [t + float(c) / len(pairs) for t, c in zip(totals, counts)]
    return totals


def collect(preset: Table1Settings, runs: Path, cases=CASES, partial: bool = False,
            previous: dict | None = None) -> dict:
    """Every figure of the complete runs (with partial, of every run with an epoch, its "epochs" saying
    how far it got): per case, per split the last epoch's per-label Dice and the curve, and the machine
    that trained it; across splits per-label and average mean ± std (in %). previous: an earlier
    table1.json whose splits are kept where runs/ has no complete run of them (runs/ is not committed:
    results collected on one machine are not lost when another adds a split)."""
    result = {"labels": list(CLASS_NAMES[1:]), "cases": {}, "epochs": preset.epochs}
    for case in cases:
        splits = {}
        for split in range(preset.splits):
            path = run_dir(runs, case, split)
            records = read_log(path)
            if not (is_complete(path, preset.epochs) or partial and records):
                earlier = _previous_split(previous, case.key, split)
                if earlier is not None:
                    splits[split] = earlier
                continue
            last = records[-1]
            per_label = [100 * v for v in last["val_dice_per_label"]]
            splits[split] = {
                "per_label": per_label,
                "average": _label_average(per_label),
                "curve": [100 * _label_average(r["val_dice_per_label"]) for r in records],
                "train_loss": [r["train_loss"] for r in records],
                "seconds": sum(r["seconds"] for r in records),
                "epochs": len(records),
                "machine": processor_name(),
            }
        per_label = [_mean_std([s["per_label"][i] for s in splits.values()]) for i in range(len(CLASS_NAMES) - 1)]
        result["cases"][case.key] = {
            "title": case.title, "model": case.model, "loss": case.loss, "gamma": case.gamma,
            "splits": splits, "per_label": per_label,
            "average": _mean_std([s["average"] for s in splits.values()]), "paper": paper_numbers(case.key),
        }
    return result


def _previous_split(previous: dict | None, key: str, split: int) -> dict | None:
    """A split of an earlier table1.json (with its machine: the split's own, else that file's)."""
    if not previous or key not in previous.get("cases", {}):
        return None
    earlier = previous["cases"][key]["splits"].get(str(split))
    if earlier is None:
        return None
    machine = previous.get("meta", {}).get("machine", {}).get("processor", "unknown")
    return {"epochs": len(earlier["curve"]), "machine": machine, **earlier}


def _cell(mean_std) -> str:
    mean, std = mean_std
    return "–" if not math.isfinite(mean) else f"{mean:.0f}±{std:.0f}"


def markdown(result: dict, header: str) -> str:
    """Table 1(b) in the paper's terms: one row per label, for each case ours | paper."""
    cases = list(result["cases"].values())
    keys = list(result["cases"])
    lines = [header, "", "Dice (mean ± std %, over the splits; each split: mean over its validation images at the "
             "last epoch). Each cell: **ours** / paper.", ""]
    voxels = result.get("label_voxels")
    lines.append("| label (paper size %) | voxels | " + " | ".join(c["title"] for c in cases) + " |")
    lines.append("|---|---|" + "---|" * len(cases))
    for i, name in enumerate(result["labels"]):
        cells = [f"**{_cell(c['per_label'][i])}** / {_cell(c['paper']['labels'][i])}" for c in cases]
        count = f"{voxels[i]:.0f}" if voxels else "–"
        lines.append(f"| {i + 1}. {name} ({PAPER_SIZES[i]}) | {count} | " + " | ".join(cells) + " |")
    cells = [f"**{_cell(c['average'])}** / {_cell(c['paper']['average'])}" for c in cases]
    lines.append("| **average** | | " + " | ".join(cells) + " |")
    lines.append("| splits | | " + " | ".join(str(len(c["splits"])) for c in cases) + " |")
    lines.append("| epochs run, of " + str(result.get("epochs", "?")) + " | | "
                 + " | ".join(",".join(str(s["epochs"]) for s in c["splits"].values()) or "–" for c in cases) + " |")
    ranking = sorted((k for k in keys if math.isfinite(result["cases"][k]["average"][0])),
                     key=lambda k: -result["cases"][k]["average"][0])
    paper_rank = sorted(keys, key=lambda k: -result["cases"][k]["paper"]["average"][0])
    lines += ["", "Ordering by average, ours: " + " > ".join(result["cases"][k]["title"] for k in ranking),
              "", "Ordering by average, paper: " + " > ".join(result["cases"][k]["title"] for k in paper_rank), ""]
    return "\n".join(lines)


def plot_fig3(result: dict, path: Path) -> None:
    """Validation Dice (average over labels, %) vs epoch per case: mean over splits, band ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    for case in result["cases"].values():
        curves = [s["curve"] for s in case["splits"].values()]
        if not curves:
            continue
        curves = np.array(curves)
        epochs = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(epochs, mean, label=f"{case['title']} ({len(curves)} splits)")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice, average of 19 labels (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), ".png")
    plt.close(fig)


def write_results(result: dict, preset_name: str, preset: Table1Settings, out: Path,
                  wall_seconds: float | None) -> None:
    """table1.md, table1.json and fig3.png under out (each written atomically)."""
    machine = {"platform": platform.platform(), "processor": processor_name(), "cpus": os.cpu_count(),
               "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    run_seconds = sum(s["seconds"] for c in result["cases"].values() for s in c["splits"].values())
    meta = {"preset": preset_name, "settings": asdict(preset), "machine": machine,
            "training_seconds_total": run_seconds, "wall_seconds_this_invocation": wall_seconds,
            "date": time.strftime("%Y-%m-%d")}
    full = {"meta": meta, **result}
    trained_on = sorted({s.get("machine", machine["processor"]) for c in result["cases"].values()
                         for s in c["splits"].values()})
    header = (f"# Table 1(b) reproduction, preset `{preset_name}` (synthetic demo dataset)\n\n"
              f"Settings: {json.dumps(asdict(preset))}; NAdam lr 1e-3, batch 1, rigid augmentation p 0.8, seed 0. "
              f"Trained on: {'; '.join(trained_on)} ({machine['cpus']} CPUs, torch {machine['torch']}, "
              f"{machine['device']} here). Training time, all runs: {run_seconds / 3600:.2f} h.")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "table1.json", lambda tmp: Path(tmp).write_text(json.dumps(full, indent=1)), ".json")
    write_atomic(out / "table1.md", lambda tmp: Path(tmp).write_text(markdown(result, header)), ".md")
    plot_fig3(result, out / "fig3.png")
