"""Graph-level options (issue 25): BatchNorm folded into the convolutions and the compiled Predictor, equal
to the plain one (fp32 to rounding, bf16 by the arg max); the compiled training step equal to the eager
one over a few steps; the whole step in one CUDA graph (CUDA tests) equal to eager, and stopped on a
non-finite step without spoiling the weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from expseg_fast.config import TrainConfig
from expseg_fast.inference.predictor import Predictor
from expseg_fast.losses import LossSpec
from expseg_fast.models import ExpLogNet, NetConfig, VNet
from expseg_fast.models.folding import fold_batchnorm
from expseg_fast.training.step import TrainStep

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def with_random_statistics(model: nn.Module, seed: int) -> nn.Module:
    """The model with BatchNorm statistics and affine parameters far from their defaults."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen))
                module.running_var.copy_(torch.rand(n, generator=gen) * 3 + 0.2)
                module.weight.copy_(torch.randn(n, generator=gen))
                module.bias.copy_(torch.randn(n, generator=gen))
    return model.eval()


@pytest.mark.parametrize("network", ["ours", "vnet"])
def test_folded_batchnorm_equals_the_network_in_float32(network):
    torch.manual_seed(0)
    model = ExpLogNet(NetConfig(num_labels=5, width=4)) if network == "ours" else VNet(num_labels=5, width=4)
    model = with_random_statistics(model, 1)
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm3d) for m in model.modules())  # the caller's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    image = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        reference = model.double()(image.double())
        found = folded(image)
    err = float((found.double() - reference).norm() / reference.norm())
    assert err < 1e-5, err


def test_the_predictors_folded_and_compiled_options_give_its_prediction():
    torch.manual_seed(2)
    model = with_random_statistics(ExpLogNet(NetConfig(num_labels=4, width=4)), 3)
    image = torch.randn(1, 1, 16, 16, 16)
    plain = Predictor(model, (1, 1, 16, 16, 16), precision="fp32", channels_last=False)
    reference = plain.logits(image).clone()
    for options in ({"fold_bn": True}, {"compiled": True}, {"fold_bn": True, "compiled": True}):
        predictor = Predictor(model, (1, 1, 16, 16, 16), precision="fp32", channels_last=False, **options)
        found = predictor.logits(image)
        assert float((found - reference).norm() / reference.norm()) < 1e-5, options
    bf16 = Predictor(model, (1, 1, 16, 16, 16), precision="bf16", channels_last=True, fold_bn=True)
    assert (bf16(image) == reference.argmax(1)).float().mean() > 0.98


def steps(mode: str, count: int, lr: float = 1e-3, device: str = "cpu", sgd: bool = False,
          rates: list[float] | None = None, tensor_lr: bool = False) -> tuple[list[float], list[bool], nn.Module]:
    """count training steps of a small network in mode: the losses, their finiteness, the model. rates: the
    learning rate set before each step (TrainStep.set_lr); tensor_lr: NAdam's rate a device tensor (the
    trainer's in cuda_graph mode, where it always is). sgd: plain SGD instead of the trainer's NAdam, which
    scales each element's step by its own gradient's size, so that elements with small gradients amplify
    rounding (compiled vs eager with one thread: weights apart by up to 2e-5 after three steps at lr 1e-3,
    beyond the tolerance below)."""
    torch.manual_seed(4)
    model = ExpLogNet(NetConfig(num_labels=5, width=4, noise_std=0.0, dropout=0.0)).to(device)
    rate = torch.tensor(lr, device=device) if tensor_lr or mode == "cuda_graph" else lr
    optimizer = (torch.optim.SGD(model.parameters(), lr=lr) if sgd
                 else torch.optim.NAdam(model.parameters(), lr=rate, capturable=mode == "cuda_graph"))
    step = TrainStep(model, model, optimizer, torch.amp.GradScaler(device, enabled=False), torch.ones(5, device=device),
                     LossSpec(), torch.float32, torch.contiguous_format, mode)
    gen = torch.Generator().manual_seed(5)
    values, finite = [], []
    for i in range(count):
        if rates is not None:
            step.set_lr(rates[i])
        image = torch.randn(1, 1, 16, 16, 16, generator=gen).to(device)
        labels = torch.randint(0, 5, (1, 16, 16, 16), generator=gen).to(device)
        value, ok = step(image, labels)
        values.append(value)
        finite.append(ok)
    return values, finite, model


def test_the_compiled_step_is_the_eager_step():
    eager, _, eager_model = steps("eager", 3, lr=0.1, sgd=True)
    compiled, _, compiled_model = steps("compiled", 3, lr=0.1, sgd=True)
    assert compiled == pytest.approx(eager, rel=1e-4)
    _, _, initial = steps("eager", 0)
    moved = max(float((a - b).abs().max()) for a, b in zip(eager_model.parameters(), initial.parameters()))
    assert moved > 1e-3  # the steps changed the weights far beyond the tolerance below
    for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name


def test_the_learning_rate_set_between_steps_is_the_one_they_step_with():
    """A rate set through TrainStep.set_lr, float or tensor, is the rate an optimizer built with it takes."""
    scheduled, _, model = steps("eager", 3, rates=[1e-3, 3e-2, 3e-2])
    as_tensor, _, tensor_model = steps("eager", 3, rates=[1e-3, 3e-2, 3e-2], tensor_lr=True)
    steady, _, steady_model = steps("eager", 3, lr=1e-3)
    assert scheduled[:2] == steady[:2] and scheduled[2] != steady[2]  # the third step sees the second's rate
    assert as_tensor == pytest.approx(scheduled, rel=1e-6)
    flat = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (model, steady_model, tensor_model)]
    apart, gap = float((flat[0] - flat[1]).norm()), float((flat[0] - flat[2]).norm())
    assert float((flat[0] - flat[1]).abs().max()) > 1e-2  # the rate moved the weights far beyond the rounding below
    # NAdam (see steps()) amplifies the float and tensor rates' different roundings in elements whose gradient
    # is rounding noise: one weight of 134 k, whose gradient was exactly 0 for two steps and then 2e-9 against
    # -6e-9 (float32 rounding of a sum of 9e-4 terms), stepped by +-lr, 1.2e-2 apart, with the native weight
    # gradient (models/conv.py; 4e-4 with PyTorch's backward). Over all the weights the tensor rate's are
    # still far nearer the float rate's than the rate moves them (norm 0.14 % of it; 0.006 % with PyTorch's)
    assert gap < apart / 100, (gap, apart)


def test_a_cuda_graph_step_is_refused_off_cuda_in_one_line():
    problem = TrainConfig(step_mode="cuda_graph").device_problem("cpu")
    assert problem == "step_mode cuda_graph needs one CUDA device and fp32 or bf16 (got cpu, fp32, 1 process(es))"
    assert TrainConfig(step_mode="cuda_graph", precision="fp16").device_problem("cuda") is not None
    assert TrainConfig(step_mode="cuda_graph", precision="bf16").device_problem("cuda") is None
    with pytest.raises(ValueError, match="step_mode must be one of eager, compiled, cuda_graph"):
        TrainConfig(step_mode="graph").check()


@pytest.mark.cuda
@cuda
def test_the_whole_step_in_a_cuda_graph_is_the_eager_step():
    eager, _, eager_model = steps("eager", 6, device="cuda")
    graphed, finite, graph_model = steps("cuda_graph", 6, device="cuda")
    assert all(finite) and graphed == pytest.approx(eager, rel=1e-3)
    for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-4), name  # NAdam: see steps()


@pytest.mark.cuda
@cuda
def test_the_graphed_step_follows_the_learning_rate_schedule():
    """The captured optimizer reads its rate from the device: rates set between replays are taken."""
    rates = [1e-3, 1e-3, 1e-3, 3e-2, 1e-2, 1e-4, 3e-2]
    eager, _, eager_model = steps("eager", 7, device="cuda", rates=rates)
    graphed, finite, graph_model = steps("cuda_graph", 7, device="cuda", rates=rates)
    steady, _, _ = steps("cuda_graph", 7, device="cuda")
    assert all(finite) and graphed == pytest.approx(eager, rel=1e-3)
    assert graphed[5:] != pytest.approx(steady[5:], rel=1e-3)
    for (name, a), b in zip(eager_model.named_parameters(), graph_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-4), name


@pytest.mark.cuda
@cuda
def test_a_resumed_graphed_run_gets_its_rate_back_on_the_device():
    """A checkpoint's optimizer is loaded to the CPU: set_lr puts the rate where the graph reads it."""
    model = nn.Linear(2, 2).cuda()
    optimizer = torch.optim.NAdam(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    saved = optimizer.state_dict()
    saved["param_groups"][0]["lr"] = saved["param_groups"][0]["lr"].cpu()
    optimizer.load_state_dict(saved)
    step = TrainStep(model, model, optimizer, torch.amp.GradScaler("cuda", enabled=False), torch.ones(2, device="cuda"),
                     LossSpec(), torch.float32, torch.contiguous_format, "cuda_graph")
    step.set_lr(5e-4)
    rate = optimizer.param_groups[0]["lr"]
    assert rate.device.type == "cuda" and float(rate) == pytest.approx(5e-4, rel=1e-7)


@pytest.mark.cuda
@cuda
def test_a_non_finite_graphed_step_is_reported_and_leaves_the_weights_finite():
    values, finite, model = steps("cuda_graph", 4, lr=1e30, device="cuda")
    assert not all(finite)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cuda
@cuda
def test_the_compiled_predictor_with_its_cuda_graph_gives_the_prediction():
    torch.manual_seed(6)
    model = with_random_statistics(ExpLogNet(NetConfig(num_labels=4, width=8)), 7).cuda()
    image = torch.randn(1, 1, 32, 32, 32, device="cuda")
    reference = Predictor(model, (1, 1, 32, 32, 32), precision="fp32", channels_last=False).logits(image).clone()
    fast = Predictor(model, (1, 1, 32, 32, 32), precision="bf16", fold_bn=True, compiled=True)
    for _ in range(3):  # warm-up, capture, replay
        labels = fast(image)
    assert (labels == reference.argmax(1)).float().mean() > 0.98
