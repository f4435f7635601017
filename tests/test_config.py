"""The one home of defaults: presets drive the training configuration and the scripts' defaults."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from expseg_fast.config import PRESETS, TrainConfig
from expseg_fast.losses import LossSpec

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))


def test_train_config_defaults_are_the_cpu_preset_and_for_preset_takes_another():
    cpu, paper = PRESETS["cpu"], PRESETS["paper"]
    assert (TrainConfig().size, TrainConfig().width, TrainConfig().epochs) == (cpu.size, cpu.width, cpu.epochs)
    c = TrainConfig.for_preset("paper", lr=0.01)
    assert (c.size, c.width, c.epochs, c.precision, c.channels_last, c.lr) == (128, 24, 100, "bf16", True, 0.01)
    assert c.demo_settings() == paper.demo


@pytest.mark.parametrize("loss, want", [
    ("exp", LossSpec(0.8, 0.2, 0.3, 0.3, False, 1e-3)),
    ("log_dice", LossSpec(1.0, 0.0, 0.3, 1.0, False, 1e-3)),
    ("linear_dice", LossSpec(1.0, 0.0, 1.0, 1.0, True, 1e-3)),
    ("cross", LossSpec(0.0, 1.0, 1.0, 0.3, False, 1.0)),  # no Dice term: eps does not apply
])
def test_loss_spec_of_each_loss_name_with_eps(loss, want):
    assert TrainConfig(loss=loss, eps=1e-3).loss_spec() == want


def test_script_defaults_come_from_the_preset_and_options_reach_the_config():
    import train as script

    config, resume = script.parse(["--eps", "1e-5", "--loss", "log_dice", "--preprocessing", "spacing"])
    d = TrainConfig.for_preset("cpu")
    assert not resume and (config.size, config.width, config.epochs) == (d.size, d.width, d.epochs)
    assert (config.eps, config.loss, config.preprocessing) == (1e-5, "log_dice", "spacing")


def test_resume_differences_separate_what_may_change():
    saved = TrainConfig(width=8)
    refused, applied = TrainConfig(width=8, epochs=40, lr=0.1, out="elsewhere").resume_differences(saved)
    assert refused == ["lr=0.1 (the run has 0.001)"] and applied == ["epochs=40 (the run has 12)"]
