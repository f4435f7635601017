"""pytest-benchmark: the network's fp32 convolutions on the CPU, forward + backward, one image channels-last:
PyTorch's own choice of backend (`stock`: F.conv3d), the engine's forward with PyTorch's backward (`slabs`:
expseg_fast/models/conv.py with the native weight gradient switched off, which takes oneDNN where PyTorch
takes its im2col path) and the engine as it trains (`engine`: the same with the native weight gradient,
csrc/conv_weight_grad.*), at synth-cpu's shapes (width 12, 64^3): the first level's one-channel input, the
decoder's 36 -> 12 at full size, the second level's first convolution and the decoder's 72 -> 24, the third
level's 48 -> 48 (four of them in the network) and the bottom's. When benchmarks are disabled each runs once
at its shape as a smoke test. Compare ratios within one run (bench/NOTES.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expseg_fast.models import conv
from expseg_fast.models.conv import conv3d

SHAPES = {"1-12@64": (1, 12, 64), "36-12@64": (36, 12, 64), "12-24@32": (12, 24, 32), "72-24@32": (72, 24, 32),
          "48-48@16": (48, 48, 16), "96-96@8": (96, 96, 8)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["stock", "slabs", "engine"])
def test_conv_fp32_cpu(benchmark, monkeypatch, kind, shape):
    cin, cout, edge = SHAPES[shape]
    if kind == "slabs":
        monkeypatch.setattr(conv, "DEVICE_TYPES", frozenset())
    torch.manual_seed(0)
    cl = torch.channels_last_3d
    x = torch.randn(1, cin, edge, edge, edge).contiguous(memory_format=cl).requires_grad_(cin > 1)
    weight = torch.randn(cout, cin, 3, 3, 3).contiguous(memory_format=cl).requires_grad_()
    grad = torch.randn(1, cout, edge, edge, edge).contiguous(memory_format=cl)
    forward = (lambda: F.conv3d(x, weight, padding=1)) if kind == "stock" else \
        (lambda: conv3d(x, weight, None, (1, 1, 1)))

    def step() -> None:
        weight.grad = None
        forward().backward(grad)

    benchmark.extra_info.update(kind=kind, shape=shape, gflop=2 * 3 * cin * cout * 27 * edge**3 / 1e9)
    benchmark(step)
    assert weight.grad is not None
