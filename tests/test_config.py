"""The one home of defaults: presets drive the training configuration and the scripts' defaults."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from expseg_fast.config import PRESETS, TrainConfig
from expseg_fast.losses import LossSpec

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))


def test_train_config_defaults_are_the_cpu_preset_and_for_preset_takes_another():
    """The README's figures: cpu 48^3, width 12, 12 epochs, fp32; paper 128^3, width 24, 100 epochs, bf16 + CL."""
    d = TrainConfig()
    assert (d.size, d.width, d.epochs, d.precision, d.channels_last) == (48, 12, 12, "fp32", False)
    c = TrainConfig.for_preset("paper", lr=0.01)
    assert (c.size, c.width, c.epochs, c.precision, c.channels_last, c.lr) == (128, 24, 100, "bf16", True, 0.01)
    assert c.demo_settings() == PRESETS["paper"].demo and c.demo_settings().field_of_view_mm == 290.0
    loss = LossSpec.exp_log()  # the paper's best L_Exp: its one home
    assert (d.w_dice, d.w_cross, d.gamma_dice, d.gamma_cross, d.eps) == (0.8, 0.2, 0.3, 0.3, 1.0) == (
        loss.w_dice, loss.w_cross, loss.gamma_dice, loss.gamma_cross, loss.eps)


@pytest.mark.parametrize("loss, want", [
    ("exp", LossSpec(0.8, 0.2, 0.3, 0.3, False, 1e-3)),
    ("log_dice", LossSpec(1.0, 0.0, 0.3, 1.0, False, 1e-3)),
    ("linear_dice", LossSpec(1.0, 0.0, 1.0, 1.0, True, 1e-3)),
    ("cross", LossSpec(0.0, 1.0, 1.0, 0.3, False, 1.0)),  # no Dice term: eps does not apply
])
def test_loss_spec_of_each_loss_name_with_eps(loss, want):
    assert TrainConfig(loss=loss, eps=1e-3).loss_spec() == want


def test_script_defaults_come_from_the_preset_and_options_reach_the_config(monkeypatch):
    import train as script

    from expseg_fast import machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "cpu_bf16_units", lambda: [])  # a CPU without bf16 units: the cpu preset
    config, resume = script.parse(["--data", "mine", "--eps", "1e-5", "--loss", "log_dice", "--preprocessing",
                                   "spacing"])
    assert not resume and (config.size, config.width, config.epochs, config.precision, config.channels_last) == (
        48, 12, 12, "fp32", False)
    assert (config.eps, config.loss, config.preprocessing) == (1e-5, "log_dice", "spacing")


def test_the_scripts_options_are_the_configurations_fields_with_their_documentation():
    """Generated, not written three times: one option per command-line field, with its type, choices and
    help; a value given for each reaches the configuration; --resume names every setting it may change."""
    import train as script

    from expseg_fast.config import RESUME_MAY_CHANGE

    parser = script.parser(TrainConfig(), "cpu")
    actions = {a.dest: a for a in parser._actions}
    fields = TrainConfig.command_line_fields()
    assert {f.name for f in fields} == set(actions) - {"help", "resume"}
    assert {"in_channels", "demo_preset"}.isdisjoint(actions)
    for f in fields:
        assert f.metadata["help"] in actions[f.name].help
        assert actions[f.name].option_strings[0] == "--" + f.name.replace("_", "-")
        assert tuple(actions[f.name].choices or ()) == tuple(f.metadata["choices"] or ())
    for name in RESUME_MAY_CHANGE:
        assert "--" + name.replace("_", "-") in actions["resume"].help
    given = {"size": "32", "width": "8", "model": "vnet", "fuse_levels": ["0", "1", "2", "3"], "lr": "0.002",
             "augment_shift": "0.1", "split": "2", "seed": "7", "max_voxels": "100000", "limit_subjects": "4",
             "loader_workers": "0", "spacing_mm": "2.5", "epochs": "3"}
    argv = [a for name, value in given.items() for a in ["--" + name.replace("_", "-"), *([value] if isinstance(
        value, str) else value)]] + ["--keep-checkpoints", "--no-channels-last", "--deterministic"]
    config, _ = script.parse(argv)
    assert (config.size, config.width, config.model, config.fuse_levels, config.lr, config.augment_shift) == (
        32, 8, "vnet", (0, 1, 2, 3), 0.002, 0.1)
    assert (config.split, config.seed, config.max_voxels, config.limit_subjects, config.loader_workers) == (
        2, 7, 100000, 4, 0)
    assert (config.spacing_mm, config.epochs, config.keep_checkpoints, config.channels_last, config.deterministic) == (
        2.5, 3, True, False, True)


def test_resume_differences_separate_what_may_change():
    saved = TrainConfig(width=8)
    refused, applied = TrainConfig(width=8, epochs=40, lr=0.1, out="elsewhere").resume_differences(saved)
    assert refused == ["lr=0.1 (the run has 0.001)"] and applied == ["epochs=40 (the run has 12)"]


def test_cpu_bf16_units_are_read_from_the_flags_line():
    from expseg_fast.machine import cpu_bf16_units, processor_name

    zen4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n"
    spr = "flags\t\t: avx512f amx_bf16 amx_tile avx512_bf16\n"
    assert cpu_bf16_units(zen4) == ["avx512_bf16"] and cpu_bf16_units(spr) == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_units("flags\t\t: fpu avx2 avx512f avx512bf16x\n") == [] and cpu_bf16_units("") == []
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    assert cpu_bf16_units() == [u for u in ("avx512_bf16", "amx_bf16") if u in flags]  # this machine's
    model = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")] \
        if Path("/proc/cpuinfo").exists() else []
    assert not model or processor_name() == model[0].split(":", 1)[1].strip()


def test_torch_device_resolves_auto_and_names_a_bad_device_in_one_line(monkeypatch):
    from expseg_fast.machine import torch_device

    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert torch_device("auto") == torch.device("cuda" if cuda else "cpu") and torch_device("cpu").type == "cpu"
        with pytest.raises(ValueError, match=r"^device must be auto, cpu or cuda, got 'gpu'$"):
            torch_device("gpu")
        if cuda:
            assert torch_device("cuda:1") == torch.device("cuda", 1)
        else:
            for name in ("cuda", "cuda:1"):
                with pytest.raises(ValueError, match=rf"^device {name}: torch sees no CUDA device on this machine"):
                    torch_device(name)


def test_the_main_command_trains_on_the_generator_at_the_precision_the_machine_multiplies(monkeypatch):
    from expseg_fast import machine
    from expseg_fast.config import main_preset, preset_precision

    assert main_preset(cuda=False) == "synth-cpu" and main_preset(cuda=True) == "synth-paper"
    for name in ("synth-cpu", "synth-paper"):
        config = TrainConfig.for_preset(name)
        assert (config.data, config.preprocessing, config.lr_schedule, config.norm) == ("synth", "spacing", "poly",
                                                                                         "instance")
    assert TrainConfig().norm == "batch" and TrainConfig.for_preset("cpu-bf16").norm == "batch"  # the paper's
    with pytest.raises(ValueError, match="norm must be one of batch, instance, got 'layer'"):
        TrainConfig(norm="layer").check()
    for units, want in [([], "fp32"), (["avx512_bf16"], "bf16"), (["avx512_bf16", "amx_bf16"], "bf16")]:
        monkeypatch.setattr(machine, "cpu_bf16_units", lambda units=units: units)
        precision, note = preset_precision("synth-cpu", 64, "ours", "cpu")
        assert precision == want and (note is None) == (want == "bf16")
        assert want == "bf16" or "does not multiply bf16 natively" in note
        assert preset_precision("synth-paper", 128, "ours", "cuda") == ("bf16", None)  # a GPU's bf16 is its own
    bf16 = TrainConfig.for_preset("cpu-bf16")
    assert (bf16.precision, bf16.channels_last, bf16.demo_preset) == ("bf16", True, "cpu")  # the cpu demo data
    assert bf16.demo_settings() == PRESETS["cpu"].demo and bf16.device_problem("cpu") is None
    assert PRESETS["cpu-bf16"].table1 == PRESETS["cpu"].table1


def test_the_learning_rate_schedules_and_a_bad_one_in_a_stored_configuration():
    """constant: lr every epoch; poly: lr (1 - e/E)^0.9 (nnU-Net's), written out: from lr down, never 0."""
    lr, epochs = float(torch.empty(()).uniform_(1e-4, 1e-2)), int(torch.randint(2, 200, ()))
    constant = TrainConfig(lr=lr, epochs=epochs)
    poly = TrainConfig(lr=lr, epochs=epochs, lr_schedule="poly")
    assert TrainConfig().lr_schedule == "constant" and [constant.lr_at(e) for e in range(epochs)] == [lr] * epochs
    rates = [poly.lr_at(e) for e in range(epochs)]
    assert rates == pytest.approx([lr * ((epochs - e) / epochs) ** 0.9 for e in range(epochs)], rel=1e-12)
    assert rates[0] == lr and all(a > b > 0 for a, b in zip(rates, rates[1:]))
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, poly, got 'cosine'"):
        TrainConfig(lr_schedule="cosine").check()


def test_bf16_at_a_2cubed_bottom_level_on_the_cpu_is_refused_naming_the_size():
    for model, size in [("ours", 16), ("vnet", 32)]:
        problem = TrainConfig(precision="bf16", model=model, size=size).device_problem("cpu")
        assert f"bf16 on the CPU needs size > {size} for {model}, got {size}" in problem
        assert TrainConfig(precision="bf16", model=model, size=size).device_problem("cuda") is None  # cuDNN: fine
        assert TrainConfig(precision="fp32", model=model, size=size).device_problem("cpu") is None
        assert TrainConfig(precision="bf16", model=model, size=size + 16).device_problem("cpu") is None


def test_the_script_refuses_cpu_bf16_at_16_before_writing(tmp_path):
    import os
    import subprocess

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts" / "train.py"), "--out", str(out),
                           "--preset", "cpu", "--size", "16", "--precision", "bf16", "--limit-subjects", "3"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 1 and "needs size > 16" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_the_presets_bf16_gives_way_to_fp32_where_it_cannot_train_unless_asked_for(monkeypatch, capsys):
    import train as script

    from expseg_fast import machine
    from expseg_fast.config import preset_precision

    monkeypatch.setattr(machine, "cpu_bf16_units", lambda: ["avx512_bf16"])
    assert preset_precision("cpu-bf16", 48, "ours", "cpu") == ("bf16", None)
    precision, note = preset_precision("cpu-bf16", 32, "vnet", "cpu")
    assert precision == "fp32" and "needs size > 32 for vnet" in note and "cpu-bf16 preset's bf16" in note
    assert preset_precision("paper", 16, "ours", "cuda") == ("bf16", None)
    assert preset_precision("cpu", 16, "ours", "cpu") == ("fp32", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.parse([])[0].precision == "bf16" and "note" not in capsys.readouterr().err
    assert script.parse(["--size", "16"])[0].precision == "fp32" and "training in fp32" in capsys.readouterr().err
    assert script.parse(["--size", "16", "--precision", "bf16"])[0].precision == "bf16"  # the trainer refuses it


def test_a_preset_named_on_the_command_line_gives_every_default(monkeypatch):
    import train as script

    from expseg_fast import machine

    monkeypatch.setattr(machine, "cpu_bf16_units", lambda: ["amx_bf16"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config, _ = script.parse(["--preset", "synth-cpu", "--epochs", "3"])
    assert (config.data, config.preprocessing, config.spacing_mm, config.size, config.augment_probability) == (
        "synth", "spacing", 2.0, 64, 0.0)
    assert (config.epochs, config.synth_repeats, config.precision) == (3, 4, "bf16")
    paper = TrainConfig.for_preset("synth-paper")
    assert (paper.size, paper.spacing_mm, paper.width, paper.data) == (128, 1.5, 24, "synth")
