"""Which figure chooses best.pt (training/selection.py, issue 35): a generator run scores Colin27 (a real T1
with manual AAL labels, Debian's mricron-data) every epoch besides its generated validation images, and
chooses best.pt by it; the choice is kept by a resumed run. (The figure against an independent Dice of the
checkpoint on Colin27: tests/test_synth.py, beside the other Colin27 scoring.)"""

from __future__ import annotations

from types import SimpleNamespace

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


def reference_best(figures: list[float], epochs: int, share: float) -> int:
    """The epoch best.pt holds after the epochs of figures: the last of the best among the schedule's last
    share where it has begun, else among all so far (independent of selection.update)."""
    first = epochs - max(1, round(share * epochs))
    pool = range(first, len(figures)) if len(figures) > first else range(len(figures))
    top = max(figures[e] for e in pool)
    return max(e for e in pool if figures[e] == top)


@pytest.mark.parametrize("trial", range(40))
def test_best_is_the_best_of_the_last_share_once_it_begins(trial):
    """Fresh random figures (with ties), epochs and shares: after every epoch the best is the reference's."""
    g = torch.Generator().manual_seed(1000 + trial)
    epochs = int(torch.randint(1, 30, (1,), generator=g))
    share = float(torch.rand(1, generator=g)) if trial % 4 else 1.0
    share = max(share, 1e-3)
    figures = (torch.randint(0, 6, (epochs,), generator=g) / 5).tolist()
    config = TrainConfig(epochs=epochs, select_last=share)
    training = SimpleNamespace(best=-1.0, best_epoch=-1, best_by=VALIDATION)
    for epoch, value in enumerate(figures):
        selection.update(config, training, {"val_dice_mean": value}, epoch)
        assert training.best_epoch == reference_best(figures[:epoch + 1], epochs, share)
        assert training.best == figures[training.best_epoch]


def test_select_last_is_checked_in_one_line():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^select_last must be in \(0, 1\], got {bad}$"):
            TrainConfig(select_last=bad).check()
    assert TrainConfig.for_preset("synth-cpu").select_last == 0.1  # the poly schedule's last tenth
    assert selection.first_candidate(TrainConfig.for_preset("synth-cpu")) == 180  # epochs 181-200 of 200


def test_best_pt_among_the_last_share_and_on_resume_with_more_epochs(tmp_path, monkeypatch, capsys):
    """Colin27's figures 0.2, 0.9, 0.4, 0.3 with the last half choosing: after two of two epochs best.pt is
    the second (0.9); resumed to four, the third opens the last half and replaces it, the fourth (lower)
    does not. The log line says among which epochs."""
    monkeypatch.setattr(selection, "colin27_check", lambda *args: RealCheck("Colin27", None, []))
    monkeypatch.setattr(trainer, "validate_real", scripted([0.2, 0.9, 0.4, 0.3]))
    out = tmp_path / "run"
    train(tiny_synth(out, 2, select_on="colin27", select_last=0.5))
    assert "among epochs 2-2 (before them: the best so far)" in capsys.readouterr().out
    assert torch.load(out / "best.pt", weights_only=False)["epoch"] == 1
    train(tiny_synth(out, 4, select_on="colin27", select_last=0.5), resume=True)
    assert "among epochs 3-4" in capsys.readouterr().out
    best, last = (torch.load(out / f, weights_only=False) for f in ("best.pt", "last.pt"))
    assert best["epoch"] == 2 and last["best_epoch"] == 2 and last["best"] == pytest.approx(0.4)
