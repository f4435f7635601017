"""pytest-benchmark: forward per volume of our network and V-Net, eager fp32 vs the Predictor's settings.

CPU at 64^3 when benchmarks are enabled (16^3 once each as a smoke test otherwise); CUDA at 128^3 with
bf16 + channels-last + CUDA graph. The one-table comparison is bench/compare_vnet.py.
"""

from __future__ import annotations

import pytest
import torch

from expseg_fast.inference.predictor import Predictor
from expseg_fast.models import ExpLogNet, NetConfig, VNet

NETWORKS = {"ours": lambda: ExpLogNet(NetConfig(num_labels=20)), "vnet": lambda: VNet(num_labels=20)}


def _bench(benchmark, network, device, size, precision, channels_last, graph):
    torch.manual_seed(0)
    model = NETWORKS[network]().to(device)
    shape = (1, 1, size, size, size)
    predictor = Predictor(model, shape, precision=precision, channels_last=channels_last, cuda_graph=graph)
    image = torch.randn(shape, device=device)

    def forward():
        out = predictor.logits(image)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    forward()
    benchmark.extra_info.update(network=network, size=size, precision=precision, channels_last=channels_last)
    out = benchmark(forward)
    assert out.shape == (1, 20, size, size, size)


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("setting", ["fp32", "bf16-cl"])
def test_forward_cpu(benchmark, network, setting):
    size = 16 if benchmark.disabled else 64
    benchmark.group = f"forward-cpu-{size}^3"
    precision, channels_last = ("fp32", False) if setting == "fp32" else ("bf16", True)
    _bench(benchmark, network, "cpu", size, precision, channels_last, graph=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("setting", ["fp32-eager", "bf16-cl-graph"])
def test_forward_cuda(benchmark, network, setting):
    size = 32 if benchmark.disabled else 128
    benchmark.group = f"forward-cuda-{size}^3"
    optimized = setting == "bf16-cl-graph"
    _bench(benchmark, network, "cuda", size, "bf16" if optimized else "fp32", optimized, graph=optimized)

