"""pytest-benchmark: a full training step (forward, exp-log loss, backward, NAdam) of our network,
eager fp32 + reference loss vs the engine (bf16 autocast where the CPU multiplies bf16 natively, channels-last,
fused loss), same run."""

from __future__ import annotations

import pytest
import torch

from bench.train_step import step_fn
from expseg_fast.models import ExpLogNet, NetConfig


@pytest.mark.parametrize("engine", [False, True], ids=["eager-fp32-reference", "engine"])
def test_train_step_cpu(benchmark, engine):
    # 32^3 even as a smoke test: at 16^3 the bottom level is 2^3, where the CPU's bf16 conv3d weight
    # gradient (oneDNN 3.12, torch 2.13, channels-last input with a contiguous output gradient) reads
    # uninitialised memory: results differ between identical calls and are sometimes NaN (bench/NOTES.md)
    size = 32
    benchmark.group = f"train-step-cpu-{size}^3"
    torch.manual_seed(0)
    model = ExpLogNet(NetConfig(num_labels=20))
    image = torch.randn(1, 1, size, size, size)
    target = torch.randint(0, 20, (1, size, size, size))
    if engine:
        model = model.to(memory_format=torch.channels_last_3d)
        image = image.to(memory_format=torch.channels_last_3d)
    step = step_fn(model, torch.optim.NAdam(model.parameters(), lr=1e-3), image, target, engine)
    step()
    loss = benchmark(step)
    assert torch.isfinite(loss)
