"""The paper's network and V-Net: shapes, parameter counts, wiring, train/eval behaviour, layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from expseg_fast.models import NORMS, ExpLogNet, NetConfig, VNet, build_model, count_parameters
from expseg_fast.models.explog_net import LevelFusion
from expseg_fast.models.instance_norm import InstanceNormReLU

SMALL = NetConfig(num_labels=5, width=4, blocks=(1, 1, 2, 2))


def test_paper_configuration_parameter_counts():
    ours = count_parameters(ExpLogNet(NetConfig(num_labels=20)))
    vnet = count_parameters(VNet(num_labels=20))
    assert 4.6e6 < ours < 5.3e6  # the paper: about 5.1 M
    assert 55e6 < vnet < 75e6  # original V-Net about 62 M (the paper quotes ~71 M)
    assert vnet / ours >= 10


@pytest.mark.parametrize("model_fn", [lambda: ExpLogNet(SMALL), lambda: VNet(num_labels=5, width=4)],
                         ids=["ours", "vnet"])
@pytest.mark.parametrize("size", [(16, 16, 16), (32, 16, 48)])
def test_output_shape(model_fn, size):
    model = model_fn()
    out = model(torch.randn(2, 1, *size))
    assert out.shape == (2, 5, *size)


@pytest.mark.parametrize("model_fn,bad", [(lambda: ExpLogNet(SMALL), (1, 1, 12, 16, 16)),
                                          (lambda: VNet(width=4), (1, 1, 24, 32, 32))], ids=["ours", "vnet"])
def test_bad_input_size_is_a_clear_error(model_fn, bad):
    with pytest.raises(ValueError, match="multiples of"):
        model_fn()(torch.randn(bad))


def test_config_validation():
    with pytest.raises(ValueError, match="fuse_levels"):
        NetConfig(fuse_levels=(5,))
    with pytest.raises(ValueError, match="dropout"):
        NetConfig(dropout=1.0)
    with pytest.raises(ValueError, match="norm must be one of batch, instance, got 'group'"):
        NetConfig(norm="group")
    with pytest.raises(ValueError, match="norm must be one of"):
        VNet(width=4, norm="layer")


def _instance_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Each image's each channel to zero mean and unit (biased) variance over its volume, then scaled and
    shifted, in float64."""
    x = x.double()
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    var = (x - mean).square().mean(dim=(2, 3, 4), keepdim=True)
    shape = (1, -1, 1, 1, 1)
    return (x - mean) / torch.sqrt(var + eps) * weight.double().view(shape) + bias.double().view(shape)


@pytest.mark.parametrize("name", ["ours", "vnet"])
def test_instance_norm_is_each_image_own_in_training_and_eval(name):
    """norm="instance": every normalisation layer matches the per-image float64 reference (learned scale and
    shift) on its real inputs; an image's logits do not depend on the batch it comes in, and are the same
    in training and eval mode (no running statistics), unlike BatchNorm's."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = build_model(name, 4, 4, (0, 1, 2), 1, "instance").double()
    norms = [m for m in model.modules() if isinstance(m, InstanceNormReLU)]
    assert norms and not any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    assert not any("running" in n for n, _ in model.named_buffers())
    with torch.no_grad():
        for m in norms:  # a learned scale and shift, not the identity they start at
            m.weight.uniform_(0.5, 2.0)
            m.bias.uniform_(-1.0, 1.0)
    checked = []
    assert all(m.relu for m in norms) == (name == "ours")  # V-Net's PReLU follows its own norm
    hooks = [m.register_forward_hook(lambda m, args, out: checked.append(torch.allclose(
        out, _instance_norm_reference(args[0], m.weight, m.bias, m.eps).clamp_min(0 if m.relu else -math.inf),
        atol=1e-10))) for m in norms]
    a, b = (torch.randn(1, 1, 32, 32, 32, dtype=torch.float64) * s + m for s, m in ((3.0, 1.0), (1.0, 0.0)))
    if name == "ours":
        model.noise.std, model.fuse.dropout = 0.0, 0.0  # only the normalisation differs between the modes
    model.train()
    alone = model(a)
    for h in hooks:
        h.remove()
    assert len(checked) == len(norms) and all(checked)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.cat([a, b]))[:1], alone, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(model.eval()(a), alone, rtol=1e-9, atol=1e-9)
        batch = build_model(name, 4, 4, (0, 1, 2), 1, "batch").double().train()
        if name == "ours":
            batch.noise.std, batch.fuse.dropout = 0.0, 0.0
        assert not torch.allclose(batch(torch.cat([a, b]))[:1], batch(a))  # the control: BatchNorm mixes images


@pytest.mark.parametrize("levels", [(0, 1, 2), (0, 1, 2, 3), (1, 3)])
def test_each_fused_level_reaches_the_output(levels):
    """Deep supervision: every fused level has a direct path to the output (its fusion weights
    get gradient and perturbing its decoder output changes the prediction)."""
    model = ExpLogNet(NetConfig(num_labels=3, width=4, blocks=(1, 1, 1, 1), fuse_levels=levels)).eval()
    widths = [4 * 2**i for i in range(4)]
    model(torch.randn(1, 1, 16, 16, 16)).square().mean().backward()
    start = 0
    for lv in sorted(levels):
        w = model.fuse.weight.grad[:, start : start + widths[lv]]
        assert w.abs().sum() > 0, f"level {lv} gets no gradient through the fusion"
        start += widths[lv]
    assert start == model.fuse.in_channels


@pytest.mark.parametrize("levels, batch, dropout, channels_last, dtype",
                         [((0, 1, 2), 1, 0.0, False, torch.float64), ((0, 1, 2), 2, 0.3, True, torch.float64),
                          ((1, 3), 3, 0.5, False, torch.float64), ((0,), 1, 0.2, True, torch.float64),
                          ((0, 1, 2), 1, 0.0, True, torch.float32), ((0,), 1, 0.0, True, torch.float32)])
def test_the_level_fusion_is_the_convolution_of_the_upsampled_concatenation(levels, batch, dropout, channels_last,
                                                                            dtype):
    """LevelFusion (the sum of each level's upsampled convolution, the dropout in the weights) against the
    paper's order in float64: the levels upsampled to full size, concatenated, whole channels dropped
    with the same mask, then the 1x1x1 convolution; values and the gradients of inputs, weight and bias.
    In float32 on the CPU the levels' convolutions and upsamplings are the engine's own ops."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    widths, full = [3 * 2**lv for lv in levels], (16, 8, 24)
    memory = torch.channels_last_3d if channels_last else torch.contiguous_format
    inputs = [torch.randn(batch, w, *(n // 2**lv for n in full), dtype=dtype).contiguous(memory_format=memory)
              .requires_grad_() for w, lv in zip(widths, levels)]
    fusion = LevelFusion(sum(widths), 5, dropout).to(dtype).train()
    with torch.no_grad():
        fusion.bias.uniform_(-1, 1)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    found = fusion(inputs, full)
    torch.manual_seed(seed)
    keep = (torch.rand(batch, sum(widths)) >= dropout).double() / (1 - dropout)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    ref_weight, ref_bias = (p.detach().double().requires_grad_() for p in (fusion.weight, fusion.bias))
    upsampled = [x if lv == 0 else F.interpolate(x, size=full, mode="trilinear", align_corners=False)
                 for x, lv in zip(ref_inputs, levels)]
    expected = F.conv3d(torch.cat(upsampled, 1) * keep[:, :, None, None, None], ref_weight, ref_bias)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(found.double(), expected, rtol=tol, atol=tol)
    grad = torch.randn_like(expected)
    found_grads = torch.autograd.grad(found, [*inputs, fusion.weight, fusion.bias], grad.to(dtype))
    expected_grads = torch.autograd.grad(expected, [*ref_inputs, ref_weight, ref_bias], grad)
    for a, b in zip(found_grads, expected_grads):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    if dropout:
        assert 0 < (keep == 0).sum() < keep.numel() or batch * sum(widths) < 8  # the mask dropped some, not all
    fusion.eval()
    with torch.no_grad():
        plain = F.conv3d(torch.cat(upsampled, 1), ref_weight, ref_bias)
        torch.testing.assert_close(fusion(inputs, full).double(), plain, rtol=tol, atol=tol)


def test_noise_and_dropout_only_in_training():
    model = ExpLogNet(NetConfig(num_labels=3, width=4, blocks=(1, 1), fuse_levels=(0, 1), noise_std=0.5, dropout=0.5))
    x = torch.randn(1, 1, 8, 8, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def conv_inputs_channels_last(model: nn.Module, x: torch.Tensor, dtype, emulate_cl_kernels: bool) -> list[bool]:
    """Runs model on x and returns, per convolution call, whether its input was channels_last_3d (each of
    the levels a LevelFusion takes).
    emulate_cl_kernels: make each convolution return channels_last_3d, as cuDNN does (PyTorch's CPU
    conv3d returns contiguous outputs whatever its input), so the check isolates the model's own ops."""
    cl = torch.channels_last_3d
    seen: list[bool] = []
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    def record(module, args) -> None:
        inputs = args[0] if isinstance(args[0], list) else [args[0]]
        seen.extend(x.is_contiguous(memory_format=cl) for x in inputs)

    hooks = [m.register_forward_pre_hook(record) for m in convs]
    if emulate_cl_kernels:
        hooks += [m.register_forward_hook(lambda m, args, out: out.contiguous(memory_format=cl)) for m in convs]
    try:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x.to(memory_format=cl))
    finally:
        for h in hooks:
            h.remove()
    seen.append(out.is_contiguous(memory_format=cl))
    return seen


MODELS = [lambda: ExpLogNet(SMALL), lambda: VNet(num_labels=5, width=4)]


@pytest.mark.parametrize("model_fn", MODELS, ids=["ours", "vnet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_channels_last_preserved_by_the_model_ops(model_fn, dtype, norm):
    """Every convolution input (and the output) stays channels_last_3d: no layout round trips."""
    model = model_fn()
    if norm != "batch":
        model = build_model("ours" if isinstance(model, ExpLogNet) else "vnet", 5, 4, norm=norm)
    model = model.to(memory_format=torch.channels_last_3d)
    seen = conv_inputs_channels_last(model, torch.randn(1, 1, 32, 32, 32), dtype, emulate_cl_kernels=True)
    assert all(seen), f"{seen.count(False)} of {len(seen)} convolution inputs / output not channels-last"


def test_channels_last_check_catches_a_layout_break():
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv3d(1, 4, 3, padding=1)
            self.b = nn.Conv3d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.b(self.a(x).contiguous())

    seen = conv_inputs_channels_last(Breaks(), torch.randn(1, 1, 8, 8, 8), torch.float32, emulate_cl_kernels=True)
    assert seen == [True, False, True]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("norm", NORMS)
def test_ours_stays_channels_last_on_the_cpu_in_fp32_with_its_own_kernels(norm):
    """No emulation: the engine's convolutions (models/conv.py) keep one fp32 image channels-last on the CPU
    at every level, the first one-channel level included (PyTorch's im2col path returns contiguous)."""
    model = build_model("ours", 5, 4, norm=norm).to(memory_format=torch.channels_last_3d)
    seen = conv_inputs_channels_last(model, torch.randn(1, 1, 32, 32, 32), torch.float32, emulate_cl_kernels=False)
    assert all(seen), f"{seen.count(False)} of {len(seen)} convolution inputs / output not channels-last"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_fn", MODELS, ids=["ours", "vnet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_channels_last_end_to_end_on_cuda(model_fn, dtype):
    model = model_fn().cuda().to(memory_format=torch.channels_last_3d)
    image = torch.randn(1, 1, 32, 32, 32, device="cuda")
    seen = conv_inputs_channels_last(model, image, dtype, emulate_cl_kernels=False)
    assert all(seen), f"{seen.count(False)} of {len(seen)} convolution inputs / output not channels-last"
