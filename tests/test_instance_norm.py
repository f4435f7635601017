"""The fused instance norm (+ ReLU) op of the native extension (expseg_fast/models/instance_norm.py,
csrc/instance_norm.*) against a float64 plain-PyTorch reference: values and every gradient, both layouts,
bf16, constant channels, offsets of 1e4, one voxel, odd shapes, batch > 1; gradcheck and opcheck; and a
network's training steps against GroupNorm + ReLU."""

from __future__ import annotations

import pytest
import torch

from expseg_fast.models import ExpLogNet, NetConfig
from expseg_fast.models import instance_norm as op
from expseg_fast.models.instance_norm import InstanceNormReLU, instance_norm_relu

pytestmark = pytest.mark.skipif("cpu" not in op.DEVICE_TYPES, reason="the native extension is not built")


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, relu: bool, eps: float = op.EPS) -> torch.Tensor:
    """Per (sample, channel) over D, H, W in float64: (x - mean) / sqrt(var + eps) * w + b, then ReLU."""
    x = x.double()
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    var = (x - mean).square().mean(dim=(2, 3, 4), keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * w.double().view(1, -1, 1, 1, 1) + b.double().view(1, -1, 1, 1, 1)
    return y.clamp_min(0) if relu else y


def inputs(shape, dtype, channels_last: bool, offset: float, gen: torch.Generator):
    x = (torch.randn(shape, dtype=torch.float64, generator=gen) * 3 + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(shape[1], dtype=torch.float64, generator=gen) + 0.5).to(stat)
    b = torch.randn(shape[1], dtype=torch.float64, generator=gen).to(stat)
    return x, w, b


def grads(fn, x, w, b, grad_y):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(grad_y.to(y.dtype))
    return y.detach(), x.grad, w.grad, b.grad


SHAPES = [(2, 5, 3, 4, 7), (1, 3, 1, 1, 1), (3, 24, 9, 8, 7), (1, 1, 5, 1, 3), (2, 7, 17, 16, 15)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_values_and_gradients_match_the_float64_reference(shape, channels_last, relu, offset):
    gen = torch.Generator().manual_seed(hash((shape, channels_last, relu, offset)) % 2**31)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4 if offset else 2e-5)):
        x, w, b = inputs(shape, dtype, channels_last, offset, gen)
        grad_y = torch.randn(shape, dtype=torch.float64, generator=gen)
        got = grads(lambda x, w, b: instance_norm_relu(x, w, b, relu), x, w, b, grad_y)
        want = grads(lambda x, w, b: reference(x, w, b, relu), x.double(), w.double(), b.double(), grad_y)
        assert got[0].dtype == dtype and got[0].is_contiguous(
            memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
        assert got[1].dtype == dtype and got[1].stride() == x.stride()
        for mine, theirs in zip(got, want):
            assert (mine.double() - theirs).abs().max().item() <= tol * (theirs.abs().max().item() + 1e-3)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 12, 10, 9, 8), (1, 7, 13, 11, 17)])
def test_bf16_in_and_out_with_float32_statistics(channels_last, shape):
    """bf16 x, y and grad_x (no casts around the op), against the float64 reference of the same bf16 inputs:
    within bf16 rounding of the outputs. The second shape's runs end in partial vectors (2431 voxels, two
    chunks, 7 channels), so both the whole-vector and the per-element code of each pass are checked."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = inputs(shape, torch.bfloat16, channels_last, 1.0, gen)
    grad_y = torch.randn(shape, dtype=torch.float64, generator=gen).bfloat16().double()
    y, gx, gw, gb = grads(lambda x, w, b: instance_norm_relu(x, w, b), x, w, b, grad_y)
    ry, rgx, rgw, rgb = grads(lambda x, w, b: reference(x, w, b, True), x.double(), w.double(), b.double(), grad_y)
    assert y.dtype == gx.dtype == torch.bfloat16 and gw.dtype == gb.dtype == torch.float32
    assert (y.double() - ry).abs().max() <= 2 ** -7 * ry.abs().max()
    assert (gx.double() - rgx).abs().max() <= 2 ** -6 * rgx.abs().max()
    terms = (grad_y * reference(x, w, b, False).sub(b.double().view(1, -1, 1, 1, 1))).abs().sum((0, 2, 3, 4))
    assert ((gw.double() - rgw).abs() <= 1e-3 * terms).all()
    assert ((gb.double() - rgb).abs() <= 1e-3 * grad_y.abs().sum((0, 2, 3, 4))).all()


def test_constant_channels_and_single_voxels_give_the_shift():
    """Variance 0: xhat = 0, so y = relu(b) and dL/dx = 0, with no NaN (GroupNorm refuses a single voxel
    in training)."""
    x = torch.full((2, 3, 4, 4, 4), 1e4, dtype=torch.float64)
    x[1] = -2.0
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    for t in (x, x[:, :, :1, :1, :1].contiguous()):
        y, gx, gw, gb = grads(lambda x, w, b: instance_norm_relu(x, w, b), t, w, b, torch.ones_like(t))
        assert torch.equal(y, b.clamp_min(0).view(1, 3, 1, 1, 1).expand_as(t))
        assert torch.equal(gx, torch.zeros_like(t)) and torch.equal(gw, torch.zeros_like(w))
        assert torch.equal(gb, (b > 0).double() * t[0, 0].numel() * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_nan_stays_in_its_channel_and_bf16_rounds_as_torch(dtype, channels_last):
    """A NaN voxel makes its own (sample, channel) NaN (ReLU keeps NaN, as torch's) and no other; every other
    output within one rounding of the reference (whole vectors and tails: 693 voxels, 5 channels)."""
    gen = torch.Generator().manual_seed(13)
    shape = (2, 5, 9, 7, 11)
    x, w, b = inputs(shape, dtype, channels_last, 0.0, gen)
    x[1, 3, 4, 2, 5] = float("nan")
    y = instance_norm_relu(x, w, b)
    nan = torch.zeros(shape, dtype=torch.bool)
    nan[1, 3] = True
    assert torch.equal(y.isnan(), nan)
    want = reference(x.float(), w, b, True).to(dtype)
    ok = ~nan
    assert (y[ok].double() - want[ok].double()).abs().max() <= (2 ** -7 if dtype == torch.bfloat16 else 1e-5) * (
        want[ok].double().abs().max())


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(relu, channels_last):
    gen = torch.Generator().manual_seed(7)
    x, w, b = inputs((2, 3, 3, 4, 2), torch.float64, channels_last, 0.5, gen)
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: instance_norm_relu(x, w, b, relu), (x, w, b))


def test_opcheck():
    gen = torch.Generator().manual_seed(8)
    for dtype, channels_last, relu in ((torch.float32, False, True), (torch.float32, True, False),
                                       (torch.bfloat16, True, True), (torch.float64, False, False)):
        x, w, b = inputs((2, 4, 3, 2, 5), dtype, channels_last, 0.0, gen)
        args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), op.EPS, relu)
        torch.library.opcheck(torch.ops.expseg_fast.instance_norm_forward.default, args)


def test_other_strides_are_made_contiguous_and_bad_shapes_are_refused():
    gen = torch.Generator().manual_seed(9)
    x, w, b = inputs((2, 3, 4, 5, 6), torch.float32, False, 0.0, gen)
    view = x.transpose(2, 4)  # neither layout
    assert torch.allclose(instance_norm_relu(view, w, b).double(), reference(view, w, b, True), atol=1e-5)
    with pytest.raises(ValueError, match=r"weight and bias must be \(C,\)"):
        instance_norm_relu(x, w[:2], b)
    with pytest.raises(ValueError, match=r"x must be \(N, C, D, H, W\)"):
        instance_norm_relu(x[0], w, b)


def network_run(monkeypatch, fused: bool, dtype: torch.dtype, memory_format: torch.memory_format, steps: int):
    """(losses, the first step's gradients, the weights after) of our network with norm="instance", SGD
    steps from one initialisation on random images, through the fused op or the GroupNorm + ReLU fallback."""
    monkeypatch.setattr(op, "DEVICE_TYPES", op.DEVICE_TYPES if fused else frozenset())
    torch.manual_seed(5)
    model = ExpLogNet(NetConfig(num_labels=4, width=4, noise_std=0.0, dropout=0.0, norm="instance"))
    model = model.to(dtype).to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen, losses, first_grads = torch.Generator().manual_seed(6), [], []
    for _ in range(steps):
        image = torch.randn(2, 1, 16, 16, 16, generator=gen).to(dtype).contiguous(memory_format=memory_format)
        labels = torch.randint(0, 4, (2, 16, 16, 16), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(image), labels)
        optimizer.zero_grad()
        loss.backward()
        first_grads = first_grads or [p.grad.double() for p in model.parameters()]
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, first_grads, [p.detach().double() for p in model.parameters()]


def test_training_steps_equal_groupnorm_and_relu(monkeypatch):
    """Three SGD steps (fp32): the fused op and GroupNorm + ReLU give the same first loss and gradients
    to float32 rounding, then losses and weights that rounding moves apart slowly (SGD: Adam's step
    divides by the gradient's size and so amplifies rounding in near-zero gradients)."""
    fused = network_run(monkeypatch, True, torch.float32, torch.contiguous_format, 3)
    fallback = network_run(monkeypatch, False, torch.float32, torch.contiguous_format, 3)
    assert fused[0][0] > fused[0][-1] + 1e-3  # it learns
    assert fused[0][0] == pytest.approx(fallback[0][0], rel=1e-6)
    for a, b in zip(fused[1], fallback[1]):  # every gradient of the first step
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    assert fused[0] == pytest.approx(fallback[0], rel=1e-4)
    for a, b in zip(fused[2], fallback[2]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_channels_last_gradients_match_the_float64_network(monkeypatch):
    """Channels-last fp32: the first step's gradients within 1e-4 of the float64 network's. (Stock
    GroupNorm misses them by up to 4 % here, in the first block: torch 2.13's channels-last CPU backward
    in fp32; bench/NOTES.md.)"""
    exact = network_run(monkeypatch, True, torch.float64, torch.contiguous_format, 1)
    fused = network_run(monkeypatch, True, torch.float32, torch.channels_last_3d, 1)
    for a, b in zip(fused[1], exact[1]):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_the_module_keeps_groupnorms_state_dict_and_outputs(monkeypatch):
    """A checkpoint of the GroupNorm era (keys weight, bias) loads, and gives GroupNorm + ReLU's outputs."""
    gen = torch.Generator().manual_seed(10)
    old = torch.nn.GroupNorm(6, 6)
    with torch.no_grad():
        old.weight.uniform_(0.5, 2.0, generator=gen)
        old.bias.uniform_(-1.0, 1.0, generator=gen)
    new = InstanceNormReLU(6)
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 6, 5, 6, 7, generator=gen)
    assert torch.allclose(new(x), torch.relu(old(x)), atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in op.DEVICE_TYPES, reason="needs the CUDA op")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_matches_the_reference_and_repeats_bitwise(channels_last, dtype):
    """The CUDA kernels: values and gradients against the float64 reference (bf16 within its rounding),
    and two runs bitwise equal (every sum in a fixed order)."""
    gen = torch.Generator().manual_seed(12)
    shape = (2, 24, 17, 16, 15)
    x, w, b = inputs(shape, dtype, channels_last, 1e4 if dtype != torch.bfloat16 else 1.0, gen)
    grad_y = torch.randn(shape, dtype=torch.float64, generator=gen)
    if dtype == torch.bfloat16:
        grad_y = grad_y.bfloat16().double()
    fn = lambda x, w, b: instance_norm_relu(x, w, b)  # noqa: E731
    got = grads(fn, x.cuda(), w.cuda(), b.cuda(), grad_y.cuda())
    again = grads(fn, x.cuda(), w.cuda(), b.cuda(), grad_y.cuda())
    want = grads(lambda x, w, b: reference(x, w, b, True), x.double(), w.double(), b.double(), grad_y)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2 ** -6}[dtype]
    for mine, repeat, theirs in zip(got, again, want):
        assert torch.equal(mine, repeat)
        if dtype != torch.bfloat16 or mine.dtype == torch.bfloat16:  # bf16's dw: a sum of rounded terms
            assert (mine.double().cpu() - theirs).abs().max().item() <= tol * (theirs.abs().max().item() + 1e-3)
