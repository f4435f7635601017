"""The weights' moving average (TrainConfig.ema_decay, expseg_fast/training/averaging.py): its values
against a float64 recurrence written out here, and a run that keeps one — validation scores the average,
checkpoints hold it for inference beside the trained weights, an inference copy drops those, and a resumed
run may not change the decay. Exact resume with an average: tests/test_train.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from expseg_fast.checkpoint import for_inference, load_checkpoint
from expseg_fast.config import TrainConfig
from expseg_fast.inference.files import load_model
from expseg_fast.training import train, validation
from expseg_fast.training.averaging import WeightAverage, decay_at


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 3, 3), nn.BatchNorm3d(3), nn.ReLU(), nn.Conv3d(3, 4, 1))


def test_decay_warms_up_then_holds():
    assert decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert decay_at(0.999, 90) == pytest.approx(91 / 100)
    assert decay_at(0.9, 1000) == 0.9 and decay_at(0.999, 10**6) == 0.999
    keeps = [decay_at(0.999, n) for n in range(1, 20000)]
    assert all(a <= b for a, b in zip(keeps, keeps[1:]))


@pytest.mark.parametrize("ema_decay", [0.5, 0.9, 0.999])
def test_the_average_follows_the_recurrence_in_float64(ema_decay):
    """After each of 40 random weight changes (BatchNorm's statistics and step count too), every floating
    tensor is keep * average + (1 - keep) * weights, from the weights it was made with; integers are copied."""
    torch.manual_seed(int(ema_decay * 1000))
    net = _net()
    average = WeightAverage(net, ema_decay)
    expected = {n: t.double().clone() for n, t in net.state_dict().items() if t.is_floating_point()}
    for n in range(1, 41):
        with torch.no_grad():
            for t in net.state_dict().values():
                t.add_(torch.randn_like(t.float()).to(t.dtype) * 3 if t.is_floating_point() else 1)
        average.update()
        keep = decay_at(ema_decay, n)
        for name, t in net.state_dict().items():
            if name in expected:
                expected[name] = keep * expected[name] + (1 - keep) * t.double()
    assert average.updates == 40
    for name, t in average.model.state_dict().items():
        if t.is_floating_point():
            torch.testing.assert_close(t.double(), expected[name], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(t, net.state_dict()[name])
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())


def test_the_average_is_a_copy_that_training_does_not_touch():
    net = _net()
    average = WeightAverage(net, 0.9)
    before = {n: t.clone() for n, t in average.model.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert all(torch.equal(t, before[n]) for n, t in average.model.state_dict().items())


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_a_decay_out_of_range_is_one_line(value):
    with pytest.raises(ValueError, match=rf"ema_decay must be in \[0, 1\), got {value}"):
        TrainConfig(ema_decay=value).check()
    with pytest.raises(ValueError, match="ema_decay must be in"):
        WeightAverage(_net(), value)


def _tiny(out, epochs: int, **overrides) -> TrainConfig:
    return TrainConfig(out=str(out), size=16, width=2, epochs=epochs, limit_subjects=4, deterministic=True, seed=5,
                       ema_decay=0.9, **overrides)


def test_a_run_validates_and_saves_the_average(tmp_path, monkeypatch):
    scored = []
    original = validation.labels_at

    def recording(model, *args, **kwargs):
        scored.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(validation, "labels_at", recording)
    out = tmp_path / "run"
    train(_tiny(out, 2))
    state = load_checkpoint(out / "last.pt")
    assert scored and all(not m.training for m in scored)
    averaged = scored[-1].state_dict()  # the network the last validation scored: the saved average
    assert all(torch.equal(t, state["model"][n]) for n, t in averaged.items())
    floating = [n for n, t in state["model"].items() if t.is_floating_point()]
    assert any(not torch.equal(state["model"][n], state["trained_model"][n]) for n in floating)
    assert state["average_updates"] > 0
    shared = for_inference(state, out / "last.pt")
    assert "trained_model" not in shared and shared["inference_only"]
    loaded = load_model(out / "last.pt", torch.device("cpu")).model.state_dict()
    assert all(torch.equal(loaded[n].float(), state["model"][n].float()) for n in floating)


def test_a_resumed_run_keeps_its_decay(tmp_path):
    out = tmp_path / "run"
    config = _tiny(out, 1)
    train(config)
    with pytest.raises(ValueError, match=r"ema_decay=0\.99 \(the run has 0\.9\)"):
        train(dataclasses.replace(config, epochs=2, ema_decay=0.99), resume=True)
