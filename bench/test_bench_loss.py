"""pytest-benchmark: loss forward + backward per backend and torch.compile(reference) (CPU sizes
always; 128^3 on CUDA; the Triton interpreter is left out on the CPU).

Run: pytest bench --benchmark-enable   (see bench/README.md for baselines and comparisons).
In the default test run benchmarks are disabled: each case runs once on a small size (a smoke test).
"""

from __future__ import annotations

import pytest
import torch

from expseg_fast.losses import LossSpec, available_backends, exp_log_loss
from expseg_fast.losses.reference import reference_loss

CPU_BACKENDS = available_backends("cpu")


def _case(benchmark, device: str, backend: str, shape, dtype, channels_last: bool):
    """backend: a loss backend, or "compile" for torch.compile of the reference."""
    torch.manual_seed(0)
    logits = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        logits = logits.to(memory_format=torch.channels_last_3d)
    logits.requires_grad_(True)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), device=device)

    weights = torch.ones(shape[1], device=device)
    compiled = torch.compile(reference_loss) if backend == "compile" else None

    def step():
        logits.grad = None
        if compiled is not None:
            compiled(logits, target, weights, LossSpec()).backward()
        else:
            exp_log_loss(logits, target, backend=backend, validate=False).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: kernel load, thread start, compilation
    benchmark.extra_info.update(backend=backend, shape=list(shape), dtype=str(dtype), channels_last=channels_last)
    benchmark(step)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"] + ["compile"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "cl3d"])
def test_loss_cpu(benchmark, backend, channels_last):
    size = 12 if benchmark.disabled else 64
    benchmark.group = f"loss-cpu-1x20x{size}^3-fp32"
    _case(benchmark, "cpu", backend, (1, 20, size, size, size), torch.float32, channels_last)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", (available_backends("cuda") + ["compile"]) if torch.cuda.is_available() else [])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "cl3d"])
def test_loss_cuda(benchmark, backend, dtype, channels_last):
    size = 32 if benchmark.disabled else 128
    benchmark.group = f"loss-cuda-1x20x{size}^3-{dtype}"
    _case(benchmark, "cuda", backend, (1, 20, size, size, size), dtype, channels_last)
