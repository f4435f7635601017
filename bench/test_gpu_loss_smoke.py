"""Smoke test of bench/gpu_loss.py's sweep logic on the CPU (Triton interpreter, a tiny shape, a
wall-clock stand-in for do_bench), so the GPU suite does not fail on a device session for a bug that
shows without a GPU. No timing is asserted."""

from __future__ import annotations

import pytest

from expseg_fast.losses import available_backends

pytestmark = pytest.mark.skipif("triton" not in available_backends("cpu") or "native" not in available_backends("cpu"),
                                reason="needs the Triton interpreter and the native op")


def test_phase_sweep_checks_every_configuration_and_writes_its_table(monkeypatch):
    import torch

    from bench import gpu_loss

    monkeypatch.setattr(gpu_loss, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_loss, "SHAPE", (1, 5, 4, 5, 6))
    monkeypatch.setattr(gpu_loss, "do_bench", gpu_loss.wall_clock_ms)
    monkeypatch.setattr(gpu_loss, "SWEEP", {"tiles": ((64, 2),), "rows": ((128, 1),)})
    phases = gpu_loss.phase_times(torch.float32, channels_last=True)
    assert [r["design"] for r in phases["stats"]] == ["tiles", "rows"] == [r["design"] for r in phases["grad"]]
    assert all(r["loss_rel_err"] < 1e-5 for r in phases["stats"])
    assert all(r["grad_rel_err"] < 1e-5 for r in phases["grad"])
    chosen = {k: gpu_loss.best(phases[k], e, 1e-4) for k, e in (("stats", "loss_rel_err"), ("grad", "grad_rel_err"))}
    row = {"case": "float32-cl3d", "ms": 1.0, "peak_extra_MiB": 1.0, "working_MiB": 1.0, "floor_ms": 0.5,
           "grad_rel_err_vs_eager": 0.0}
    results = {"environment": {"card": "cpu", "torch": "", "triton": "", "cuda": ""}, "shape": [1, 5, 4, 5, 6],
               "copy_bandwidth_Bps": 1e9, "tuning": {"float32-cl3d": {**phases, "chosen": chosen}},
               "cases": [{**row, "variant": "eager"}, {**row, "variant": "triton"}]}
    table = gpu_loss.markdown(results)
    assert "| float32-cl3d | grad |" in table and "tiles 64x2" in table
