"""Saturated softmax, absent labels, one-label samples and extreme gamma: finite and accurate."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    loss_and_grad,
    make_target,
    mp_loss_and_grad,
    needs_triton_cpu,
    oracle_loss,
    rel_err,
    use_backend,
    with_triton_designs,
)

from expseg_fast.losses import LossSpec, available_backends, loss

BACKENDS = available_backends("cpu")
GAMMAS = [0.1, 0.3, 1.0, 3.0]


def saturated_logits(target: torch.Tensor, num_labels: int, margin: float, wrong: float, dtype) -> torch.Tensor:
    """Logits with `margin` between one label and the rest: the target's label, except a fraction
    `wrong` of voxels where another label wins by the same margin."""
    n, d, h, w = target.shape
    winner = target.clone()
    flip = torch.rand(target.shape) < wrong
    winner[flip] = (target[flip] + 1 + torch.randint(0, num_labels - 1, (int(flip.sum()),))) % num_labels
    z = torch.randn(n, num_labels, d, h, w, dtype=torch.float64) * 0.5
    z.scatter_add_(1, winner.unsqueeze(1), torch.full((n, 1, d, h, w), margin, dtype=torch.float64))
    return z.to(dtype)


@pytest.mark.parametrize("backend", with_triton_designs(BACKENDS))
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("margin", [30.0, 100.0])
@pytest.mark.parametrize("wrong", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("linear", [False, True], ids=["exp", "linear"])
def test_saturated_logits_finite_and_accurate(backend, gamma, margin, wrong, dtype, linear):
    backend = use_backend(backend)
    num_labels = 6
    target = make_target((2, num_labels, 4, 5, 3), num_labels - 1)  # the last label is absent
    logits = saturated_logits(target, num_labels, margin, wrong, dtype)
    spec = LossSpec.linear() if linear else LossSpec.exp_log(gamma_dice=gamma, gamma_cross=gamma)
    weights = torch.rand(num_labels) + 0.5
    value, grad = loss_and_grad(lambda z: loss(z, target, weights, spec, backend), logits)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    # Judge: the loss and gradient in 80-digit arithmetic (float64 loses 1 - p_l and -ln Dice_i to
    # rounding at these margins).
    ref_value, ref_grad = mp_loss_and_grad(logits, target, weights, spec)
    assert abs(float(value) - ref_value) <= 1e-5 * abs(ref_value) + 1e-7
    err = float((grad.double() - ref_grad).norm())
    root_n = grad.numel() ** 0.5
    # Gradients near or below the dtype's smallest normal number are only accurate to that
    # resolution; at margin 100 the float32 probabilities of the losing labels (e^-100) are
    # themselves subnormal, with few significant bits (or flushed to zero by a vectorised exp).
    resolution = 4 * torch.finfo(dtype).tiny * root_n
    if margin > 80:
        resolution += 1e-5 / target.numel() * root_n
    rtol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    if backend == "native":
        assert err <= rtol * float(ref_grad.norm()) + resolution
    else:
        # Autograd through softmax computes p_j * g_j - p_j * sum_k p_k g_k, which cancels for
        # confident voxels: the reference is accurate to float32 rounding of the gradient's natural
        # scale (w_dice / (N C) for the Dice part), not relative to the tiny saturated gradient.
        scale = spec.w_dice / (target.shape[0] * num_labels) + spec.w_cross * float(weights.max()) / target.numel()
        assert err <= rtol * float(ref_grad.norm()) + 1e-6 * scale * root_n + resolution


@pytest.mark.parametrize("backend", with_triton_designs(BACKENDS))
@pytest.mark.parametrize("gamma", GAMMAS)
def test_one_label_sample_and_absent_labels(backend, gamma):
    backend = use_backend(backend)
    num_labels = 5
    shape = (2, num_labels, 3, 4, 5)
    target = torch.full((2, 3, 4, 5), 2)
    target[1] = 4
    logits = torch.randn(shape)
    spec = LossSpec.exp_log(gamma_dice=gamma, gamma_cross=gamma)
    value, grad = loss_and_grad(lambda z: loss(z, target, None, spec, backend), logits)
    ref_value, ref_grad = loss_and_grad(lambda z: oracle_loss(z, target, None, spec), logits.double())
    assert abs(float(value) - float(ref_value)) <= 1e-5 * float(ref_value)
    assert rel_err(grad, ref_grad) < 1e-4


@pytest.mark.parametrize("backend", with_triton_designs(BACKENDS))
def test_perfect_prediction_gives_zero_loss_and_finite_gradient(backend):
    """Dice_i -> 1 and t -> 0: the floor keeps gamma < 1 gradients finite, the loss is exact."""
    backend = use_backend(backend)
    target = make_target((1, 3, 4, 4, 4), 3)
    logits = 200.0 * torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    for gamma in GAMMAS:
        value, grad = loss_and_grad(lambda z: loss(z, target, None, LossSpec.cross(gamma), backend), logits)
        assert float(value) == 0.0 and torch.isfinite(grad).all()
        value, grad = loss_and_grad(lambda z: loss(z, target, None, LossSpec.log_dice(gamma), backend), logits)
        assert 0.0 <= float(value) < 1e-6 and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", with_triton_designs(BACKENDS))
def test_noncontiguous_view_is_read_in_place(backend):
    backend = use_backend(backend)
    base = torch.randn(2, 7, 6, 5, 8)
    logits = base[:, 1:6, :, ::2, 1:7]  # not dense: strided in C, H and W
    target = make_target(tuple(logits.shape), 5)
    spec = LossSpec()
    value, grad = loss_and_grad(lambda z: loss(z, target, None, spec, backend), logits)
    ref_value, ref_grad = loss_and_grad(lambda z: oracle_loss(z, target, None, spec), logits.contiguous().double())
    assert abs(float(value) - float(ref_value)) <= 1e-5 * float(ref_value)
    assert rel_err(grad, ref_grad) < 1e-4


@needs_triton_cpu
@pytest.mark.parametrize("design", ["triton", "triton-rows"])
def test_triton_deterministic_mode_is_bitwise_repeatable_and_matches_atomic_mode(design):
    use_backend(design)
    check_triton_determinism("cpu")


def check_triton_determinism(device: str) -> None:
    logits = torch.randn(2, 5, 7, 9, 11, device=device)
    target = make_target(tuple(logits.shape), 5).to(device)
    spec = LossSpec()
    atomic = loss_and_grad(lambda z: loss(z, target, None, spec, "triton"), logits)
    torch.use_deterministic_algorithms(True)
    try:
        first = loss_and_grad(lambda z: loss(z, target, None, spec, "triton"), logits)
        second = loss_and_grad(lambda z: loss(z, target, None, spec, "triton"), logits)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert abs(float(first[0]) - float(atomic[0])) <= 1e-6 * float(atomic[0])
    assert rel_err(first[1], atomic[1]) < 1e-6


def test_native_statistics_do_not_depend_on_thread_count():
    logits = torch.randn(2, 20, 17, 19, 23)
    target = make_target(tuple(logits.shape), 20)
    spec = LossSpec()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grad(lambda z: loss(z, target, None, spec, "native"), logits)
        torch.set_num_threads(max(2, threads))
        many = loss_and_grad(lambda z: loss(z, target, None, spec, "native"), logits)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("backend", with_triton_designs(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64, torch.int8], ids=str)
def test_label_dtypes(backend, dtype):
    backend = use_backend(backend)
    logits = torch.randn(1, 4, 3, 3, 3)
    target = make_target(tuple(logits.shape), 4)
    expected = loss(logits, target, None, LossSpec(), backend)
    assert torch.equal(loss(logits, target.to(dtype), None, LossSpec(), backend), expected)
