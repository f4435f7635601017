"""The predictor against the eager fp32 model (CPU eager path; the CUDA-graph path in the GPU suite)."""

from __future__ import annotations

import pytest
import torch

from expseg_fast.inference.predictor import Predictor, class_softmax
from expseg_fast.models import ExpLogNet, NetConfig


def trained_like_model(device="cpu") -> ExpLogNet:
    torch.manual_seed(0)
    model = ExpLogNet(NetConfig(num_labels=4, width=4, blocks=(1, 1, 2), fuse_levels=(0, 1))).to(device)
    model.train()
    with torch.no_grad():  # settle the BatchNorm running statistics
        for _ in range(3):
            model(torch.randn(2, 1, 16, 16, 16, device=device))
    return model.eval()


def test_predictor_matches_eager_fp32_on_cpu():
    model = trained_like_model()
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = model(image).argmax(1)
    predictor = Predictor(model, image.shape, precision="fp32", channels_last=True)
    labels, probs = predictor.predict(image, probabilities=True)
    assert labels.shape == (1, 16, 16, 16) and probs.shape == (1, 4, 16, 16, 16)
    assert (labels == expected).float().mean() >= 0.999
    assert torch.allclose(probs.sum(1), torch.ones(1, 16, 16, 16))
    assert torch.equal(predictor.probabilities(image), probs)  # what sliding windows blend, without the arg max


@pytest.mark.parametrize("memory_format", [torch.channels_last_3d, torch.contiguous_format],
                         ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("shape", [(1, 18, 6, 5, 4), (3, 2, 1, 1, 7)])
def test_the_class_softmax_is_the_softmax_over_classes_in_the_logits_layout(memory_format, shape):
    logits = torch.randn(shape) * 30  # far beyond exp's float32 range without the shift by the maximum
    logits[0, :, 0, 0, 0] = 1e4
    logits = logits.contiguous(memory_format=memory_format)
    found = class_softmax(logits)
    assert found.dtype == torch.float32 and found.shape == logits.shape
    assert found.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(found.double(), torch.softmax(logits.double(), dim=1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(class_softmax(logits.bfloat16()).double(), torch.softmax(logits.bfloat16().double(), 1),
                               rtol=1e-6, atol=1e-7)


def test_predictor_bf16_agrees_with_fp32():
    model = trained_like_model()
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = model(image).argmax(1)
    labels = Predictor(model, image.shape, precision="bf16")(image)
    assert (labels == expected).float().mean() >= 0.97  # bf16 flips near-ties only


def test_predictor_leaves_the_callers_model_as_it_was():
    model = trained_like_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predictor = Predictor(model, (1, 1, 16, 16, 16), precision="bf16", channels_last=True)
    predictor(torch.randn(1, 1, 16, 16, 16))
    assert model.training and all(m.training for m in model.modules())
    assert all(p.is_contiguous() for p in model.parameters())  # not converted to channels-last
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not predictor.model.training


def test_predictor_rejects_other_shapes_and_precisions():
    model = trained_like_model()
    predictor = Predictor(model, (1, 1, 16, 16, 16), precision="fp32")
    with pytest.raises(ValueError, match="shape"):
        predictor(torch.randn(1, 1, 16, 16, 32))
    with pytest.raises(ValueError, match="precision"):
        Predictor(model, (1, 1, 16, 16, 16), precision="int8")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_predictor_matches_eager(precision):
    model = trained_like_model("cuda")
    images = [torch.randn(1, 1, 16, 16, 16, device="cuda") for _ in range(3)]
    with torch.no_grad():
        expected = [model(image).argmax(1) for image in images]
    predictor = Predictor(model, images[0].shape, precision=precision)
    labels = [predictor(image).clone() for image in images]  # capture, then replays on new inputs
    assert predictor._graph is not None
    assert torch.equal(predictor(images[0]), labels[0])  # a replay gives the captured call's result
    for got, want in zip(labels, expected):
        assert (got == want).float().mean() >= (0.999 if precision == "fp32" else 0.97)


def test_a_checkpoint_infers_in_bf16_on_a_cpu_only_where_it_trained_in_bf16_and_the_cpu_multiplies_it(monkeypatch):
    """inference_precision (segment.py, evaluate.py): CUDA takes the run's precision; the CPU bf16 only for a
    bf16 run on a processor with bf16 units (else fp32: emulated bf16 is slow), and the predictor built for
    such a run computes in bf16."""
    from expseg_fast.config import TrainConfig
    from expseg_fast.inference import files

    bf16, fp32 = TrainConfig(precision="bf16", size=32), TrainConfig(precision="fp32")
    monkeypatch.setattr(files, "cpu_bf16_units", lambda: ["avx512_bf16"])
    assert files.inference_precision(bf16, "cpu") == "bf16" and files.inference_precision(fp32, "cpu") == "fp32"
    assert files.predictor_for(trained_like_model(), bf16, bf16.plan(), torch.device("cpu")).dtype == torch.bfloat16
    monkeypatch.setattr(files, "cpu_bf16_units", lambda: [])
    assert files.inference_precision(bf16, "cpu") == "fp32"
    assert files.inference_precision(bf16, "cuda") == "bf16" and files.inference_precision(fp32, "cuda") == "fp32"
