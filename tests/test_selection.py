"""Which figure chooses best.pt (training/selection.py, issue 35): a generator run scores Colin27 (a real T1
with manual AAL labels, Debian's mricron-data) every epoch besides its generated validation images, and
chooses best.pt by it; the choice is kept by a resumed run. (The figure against an independent Dice of the
checkpoint on Colin27: tests/test_synth.py, beside the other Colin27 scoring.)"""

from __future__ import annotations

import pytest
import torch
from test_synth import tiny_synth

from expseg_fast.config import TrainConfig
from expseg_fast.data import anatomy
from expseg_fast.runlog import read_log
from expseg_fast.training import selection, train, trainer
from expseg_fast.training.selection import COLIN27, VALIDATION, RealCheck, best_by


def test_select_on_is_checked_in_one_line():
    with pytest.raises(ValueError, match="select_on must be one of auto, validation, colin27, got 'best'"):
        TrainConfig(select_on="best").check()
    with pytest.raises(ValueError, match="select_on colin27 needs data synth without val_data"):
        TrainConfig(select_on="colin27").check()


def test_auto_chooses_colin27_only_for_a_generator_run_that_finds_it(tmp_path, monkeypatch):
    synth = TrainConfig(data="synth")
    monkeypatch.setattr(anatomy, "COLIN27", tmp_path)  # not installed
    assert best_by(synth, None) == VALIDATION
    for name in ("ch2bet.nii.gz", "aal.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    assert best_by(synth, None) == COLIN27
    assert best_by(TrainConfig(), None) == VALIDATION  # the demo data: its own split
    assert best_by(TrainConfig(data="synth", select_on="validation"), None) == VALIDATION
    # a resumed run keeps its figure (checkpoints from before the choice: upgraded to validation by load_checkpoint)
    assert best_by(synth, {"best_by": VALIDATION}) == VALIDATION
    monkeypatch.setattr(anatomy, "COLIN27", tmp_path / "gone")
    assert best_by(synth, {"best_by": COLIN27}) == COLIN27


def scripted(figures: list[float]):
    """validate_real's stand-in: epoch e's Colin27 Dice is figures[e] for every scored class."""
    calls = iter(figures)

    def validate_real(run):
        dice = torch.full((1, len(run.pinned.names)), next(calls))
        dice[:, 0] = 1.0  # background, left out of the mean
        return dice

    return validate_real


def test_best_pt_follows_the_chosen_figure(tmp_path, monkeypatch):
    """Colin27's figures 0.2, 0.6, 0.4: best.pt is the second epoch whatever the generated images say; every
    record names the figure, the checkpoint keeps it for a resumed run (exact resume with it: test_synth)."""
    monkeypatch.setattr(selection, "colin27_check", lambda *args: RealCheck("Colin27", None, []))
    monkeypatch.setattr(trainer, "validate_real", scripted([0.2, 0.6, 0.4]))
    out = tmp_path / "run"
    train(tiny_synth(out, 3, select_on="colin27"))
    log = read_log(out / "log.jsonl")
    assert [r["colin27_dice_mean"] for r in log] == pytest.approx([0.2, 0.6, 0.4])
    assert {r["best_by"] for r in log} == {COLIN27}
    best, last = (torch.load(out / f, weights_only=False) for f in ("best.pt", "last.pt"))
    assert best["epoch"] == 1 and last["best_epoch"] == 1 and last["best_by"] == COLIN27
    assert last["best"] == pytest.approx(0.6)
