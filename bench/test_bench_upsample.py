"""pytest-benchmark: the network's trilinear upsamplings on the CPU, forward + backward, channels-last:
F.interpolate (`stock`) against the engine's op (`op`: expseg_fast/models/upsample.py) at synth-cpu's
shapes (the fusion's 33 labels from 16^3 and 32^3 to 64^3, the decoder's 24 channels from 32^3), fp32 and
bf16. Both allocate their outputs afresh each call, as in training (glibc returns memory over 32 MB to
the system, so each call pays its first-touch page faults: bench/NOTES.md). When benchmarks are disabled
each runs once at a quarter of the edge as a smoke test. Compare ratios within one run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expseg_fast.models import upsample as op

SHAPES = {"33@16->64": (33, 16, 64), "33@32->64": (33, 32, 64), "24@32->64": (24, 32, 64)}


@pytest.mark.skipif("cpu" not in op.DEVICE_TYPES, reason="the native extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["stock", "op"])
def test_upsample_cpu(benchmark, kind, shape, dtype):
    channels, edge, out = SHAPES[shape]
    if benchmark.disabled:
        edge, out = edge // 4, out // 4
    torch.manual_seed(0)
    x = torch.randn(1, channels, edge, edge, edge, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    grad = torch.randn(1, channels, out, out, out, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    size = (out, out, out)
    forward = (lambda: F.interpolate(x, size=size, mode="trilinear", align_corners=False)) if kind == "stock" \
        else (lambda: op.upsample(x, size))

    def step() -> None:
        x.grad = None
        forward().backward(grad)

    benchmark.extra_info.update(kind=kind, shape=shape, dtype=str(dtype), out_bytes=grad.numel() * grad.element_size())
    benchmark(step)
    assert x.grad is not None and x.grad.dtype == dtype
