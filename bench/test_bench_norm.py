"""pytest-benchmark: the normalisation + ReLU after a convolution, forward + backward, at the generator
presets' full-resolution shapes: the engine's fused instance norm against GroupNorm + ReLU (what
norm="instance" was) and BatchNorm + ReLU (norm="batch"), bf16 channels-last (the CPU presets' features).

CPU: synth-cpu's (1, 12, 64^3) and synth-paper's (1, 24, 128^3) when benchmarks are enabled (16^3 once
each as a smoke test otherwise); CUDA: the same shapes. Compare ratios within one run (bench/NOTES.md).
Floor: forward reads x twice and writes y, backward reads grad_y, x and y twice and writes grad_x:
8 passes over the activation's bytes in all.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from expseg_fast.models import instance_norm as op
from expseg_fast.models.instance_norm import InstanceNormReLU

SHAPES = {"synth-cpu": (1, 12, 64), "synth-paper": (1, 24, 128)}


def layers(kind: str, channels: int) -> nn.Module:
    if kind == "fused":
        return InstanceNormReLU(channels)
    norm = nn.GroupNorm(channels, channels) if kind == "groupnorm" else nn.BatchNorm3d(channels)
    return nn.Sequential(norm, nn.ReLU())


def _bench(benchmark, kind: str, shape: str, device: str) -> None:
    n, c, size = SHAPES[shape]
    if benchmark.disabled:
        size = 16
    torch.manual_seed(0)
    module = layers(kind, c).to(device)
    x = torch.randn(n, c, size, size, size, device=device, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    grad = torch.randn_like(x)

    def step():
        x.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):  # as in training: GroupNorm and BatchNorm run in fp32
            y = module(x)
        y.backward(grad.to(y.dtype))
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    benchmark.extra_info.update(kind=kind, shape=shape, size=size, bytes=x.numel() * x.element_size())
    benchmark(step)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


@pytest.mark.skipif("cpu" not in op.DEVICE_TYPES, reason="the native extension is not built")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["fused", "groupnorm", "batchnorm"])
def test_norm_relu_cpu(benchmark, kind, shape):
    _bench(benchmark, kind, shape, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in op.DEVICE_TYPES, reason="needs the CUDA op")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["fused", "groupnorm", "batchnorm"])
def test_norm_relu_cuda(benchmark, kind, shape):
    _bench(benchmark, kind, shape, "cuda")
