"""pytest-benchmark: the normalisation + ReLU after a convolution, forward + backward, at the generator
presets' full-resolution shapes: the engine's fused instance norm against GroupNorm + ReLU (what
norm="instance" was) and BatchNorm + ReLU (norm="batch"), bf16 channels-last (the CPU presets' features).

CPU: synth-cpu's (1, 12, 64^3) and synth-paper's (1, 24, 128^3) when benchmarks are enabled (16^3 once
each as a smoke test otherwise); CUDA: the same shapes. Compare ratios within one run (bench/NOTES.md).
The floor (8 passes over the activation) against the measured copy bandwidth: bench/norm_step.py, the GPU
suite's `norm` part.
"""

from __future__ import annotations

import pytest
import torch

from bench.norm_step import KINDS, SHAPES, forward_backward
from expseg_fast.models import instance_norm as op


def _bench(benchmark, kind: str, shape: str, device: str) -> None:
    n, c, size = SHAPES[shape]
    if benchmark.disabled:
        size = 16
    step, x = forward_backward(kind, n, c, size, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()
    benchmark.extra_info.update(kind=kind, shape=shape, size=size, bytes=x.numel() * x.element_size())
    benchmark(lambda: (step(), sync()))
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


@pytest.mark.skipif("cpu" not in op.DEVICE_TYPES, reason="the native extension is not built")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", KINDS)
def test_norm_relu_cpu(benchmark, kind, shape):
    _bench(benchmark, kind, shape, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in op.DEVICE_TYPES, reason="needs the CUDA op")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", KINDS)
def test_norm_relu_cuda(benchmark, kind, shape):
    _bench(benchmark, kind, shape, "cuda")
