"""Versioned checkpoints (issue 37): a checkpoint of every earlier format, made with the code of the commit
that wrote it (tests/fixtures/checkpoints/make.py), loads through today's code in today's form, gives the
logits that code gave, and resumes; a format from a newer release is refused in one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from expseg_fast.checkpoint import CURRENT_KEYS, FORMAT, KEYS, load_checkpoint
from expseg_fast.config import VALIDATION, TrainConfig
from expseg_fast.data.identity import DataPin
from expseg_fast.inference.files import load_model
from expseg_fast.runlog import read_log
from expseg_fast.training import train

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
# each earlier format's fixture, and the keys beyond KEYS its commit wrote (synth_rng: a generator run's)
WRITTEN = {
    0: ("v0-base", set()),
    1: ("v1-best-epoch-data-range", {"best_epoch", "data_range"}),
    2: ("v2-data-pin", {"best_epoch", "data_range", "data_pin"}),
    3: ("v3-plan-synth", {"best_epoch", "data_range", "data_pin", "plan", "synth_rng"}),
    4: ("v4-best-by-synth", {"best_epoch", "data_range", "data_pin", "plan", "synth_rng", "best_by"}),
    5: ("v5-format-synth", {"best_epoch", "data_range", "data_pin", "plan", "synth_rng", "best_by", "format",
                            "inference_only"}),
}


def _raw(version: int) -> dict:
    return torch.load(FIXTURES / f"{WRITTEN[version][0]}.pt", map_location="cpu", weights_only=True)


def test_there_is_a_fixture_of_each_earlier_format_as_its_commit_wrote_it():
    assert sorted(WRITTEN) == list(range(FORMAT))
    for version, (_, added) in WRITTEN.items():
        assert set(_raw(version)) == set(KEYS) | added, version


@pytest.mark.parametrize("version", sorted(WRITTEN))
def test_a_checkpoint_of_an_earlier_format_loads_in_todays_form_with_its_own_logits(version):
    name, added = WRITTEN[version]
    raw, state = _raw(version), load_checkpoint(FIXTURES / f"{name}.pt")
    assert set(CURRENT_KEYS) <= set(state) and state["format"] == FORMAT and state["inference_only"] is False
    for key in {"config", "class_names", "epoch", "best", *added} - {"data_range", "synth_rng", "format"}:
        assert state[key] == raw[key], key  # what it held is kept as it was
    assert all(torch.equal(state["model"][n], t) for n, t in raw["model"].items())
    assert state["best_epoch"] == raw.get("best_epoch", -1) and state["best_by"] == raw.get("best_by", VALIDATION)
    config = TrainConfig.from_json(raw["config"])
    seen = json.loads(state["data_range"])
    if "data_range" in raw and config.data != "synth":
        assert seen == json.loads(raw["data_range"])
    if config.data == "synth":  # the composition that the generator presets' out-of-range notes compare against
        composition = seen["composition"]
        assert set(composition) == {"foreground_ml", "share_mean", "share_spread"}
        assert len(composition["share_mean"]) == len(raw["class_names"]) - 1
        assert composition["foreground_ml"][0] <= composition["foreground_ml"][1]

    loaded = load_model(FIXTURES / f"{name}.pt", torch.device("cpu"))
    expected = torch.load(FIXTURES / f"{name}.logits.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        logits = loaded.model.float()(expected["input"])[:, :, ::2, ::2, ::2]
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)
    assert loaded.data_range == (None if version == 0 else seen)
    assert (loaded.pin is None) == (version < 2) and (version < 2 or isinstance(loaded.pin, DataPin))
    plan = json.loads(raw["plan"]) if "plan" in raw else config.plan().record()
    assert loaded.plan.record() == plan and loaded.epochs == int(raw["epoch"]) + 1


def test_the_oldest_format_resumes_and_its_run_writes_todays(tmp_path, capsys):
    """A run of format 0 (before best_epoch, data_range and the pin) trains on: its split recomputed with a
    warning, its checkpoints written in today's format with every key."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURES / "v0-base.pt", run / "last.pt")
    saved = TrainConfig.from_json(_raw(0)["config"])
    train(dataclasses.replace(saved, out=str(run), epochs=2), resume=True)
    written = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert set(CURRENT_KEYS) <= set(written) and written["format"] == FORMAT and written["epoch"] == 1
    assert [r["epoch"] for r in read_log(run / "log.jsonl")] == [1]
    assert "predates pinned splits: its split is recomputed" in capsys.readouterr().err


@pytest.mark.parametrize("value, problem", [(FORMAT + 1, f"format {FORMAT + 1} by a newer expseg_fast"),
                                            ("five", "format number 'five' is not an integer")])
def test_a_format_this_code_cannot_read_is_one_line(tmp_path, value, problem):
    state = _raw(4)
    state["format"] = value
    torch.save(state, tmp_path / "next.pt")
    with pytest.raises(ValueError, match=f"next.pt: .*{problem}"):
        load_checkpoint(tmp_path / "next.pt")
