"""The public API: named losses, modules, backend selection, label weights, bad input, opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_logits, make_target, needs_triton_cpu, oracle_loss, use_backend, with_triton_designs

import expseg_fast
from expseg_fast.losses import (
    CrossLoss,
    ExpLogLoss,
    LinearDiceLoss,
    LogDiceLoss,
    LossSpec,
    available_backends,
    cross_loss,
    exp_log_loss,
    label_counts,
    label_weights,
    linear_dice_loss,
    log_dice_loss,
    loss,
)

BACKENDS = available_backends("cpu")


def inputs(shape=(2, 5, 3, 4, 5)):
    return make_logits(shape), make_target(shape, shape[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_losses_and_modules_match_the_oracle(backend):
    logits, target = inputs()
    weights = label_weights(label_counts([target], 5))
    cases = [
        (exp_log_loss(logits, target, weights, backend=backend), ExpLogLoss(weights, backend=backend), LossSpec()),
        (linear_dice_loss(logits, target, backend=backend), LinearDiceLoss(backend=backend),
         LossSpec(w_dice=1, w_cross=0, gamma_dice=1, gamma_cross=1, linear_dice=True)),
        (log_dice_loss(logits, target, gamma=0.5, backend=backend), LogDiceLoss(0.5, backend=backend),
         LossSpec(w_dice=1, w_cross=0, gamma_dice=0.5, gamma_cross=1)),
        (cross_loss(logits, target, weights, gamma=2.0, backend=backend), CrossLoss(weights, 2.0, backend=backend),
         LossSpec(w_dice=0, w_cross=1, gamma_dice=1, gamma_cross=2)),
    ]
    for value, module, spec in cases:
        expected = float(oracle_loss(logits, target, weights if spec.w_cross else None, spec))
        assert math.isclose(float(value), expected, rel_tol=1e-5)
        assert math.isclose(float(module(logits, target)), expected, rel_tol=1e-5)


def test_paper_defaults():
    spec = LossSpec()
    assert (spec.w_dice, spec.w_cross, spec.gamma_dice, spec.gamma_cross, spec.eps) == (0.8, 0.2, 0.3, 0.3, 1.0)
    module = ExpLogLoss()
    assert module.spec == spec and module.backend == "auto"


def test_auto_picks_the_fastest_available_and_top_level_exports():
    assert available_backends("cpu")[0] == "native"  # never the Triton interpreter
    logits, target = inputs()
    assert torch.equal(expseg_fast.exp_log_loss(logits, target), exp_log_loss(logits, target, backend="native"))


def test_unknown_or_unavailable_backend_is_a_clear_error():
    logits, target = inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        exp_log_loss(logits, target, backend="fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        ExpLogLoss(backend="cuda")


def test_module_weights_follow_the_module():
    weights = torch.tensor([1.0, 2.0, 3.0])
    module = ExpLogLoss(weights).double()
    assert "weights" in dict(module.named_buffers())
    assert torch.equal(module.weights, weights.double())


def test_label_weights_formula():
    counts = torch.tensor([900.0, 90.0, 9.0, 1.0])
    expected = torch.sqrt(counts.sum() / counts).float()
    assert torch.allclose(label_weights(counts), expected)
    assert torch.equal(label_weights([4, 1]), torch.tensor([math.sqrt(5 / 4), math.sqrt(5)], dtype=torch.float32))


def test_label_counts_over_volumes():
    volumes = [torch.tensor([[0, 1], [1, 2]]), torch.tensor([2, 2, 2], dtype=torch.uint8)]
    assert label_counts(volumes, 4).tolist() == [1, 2, 4, 0]
    with pytest.raises(ValueError, match=r"targets\[1\]"):
        label_counts([torch.tensor([0]), torch.tensor([5])], 4)


def test_label_weights_rejects_absent_labels_and_bad_counts():
    with pytest.raises(ValueError, match=r"labels \[1\] never occur"):
        label_weights([3, 0, 2])
    with pytest.raises(ValueError, match="counts"):
        label_weights([3, -1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_and_types_name_the_argument(backend):
    logits, target = inputs()
    cases = [
        (lambda: exp_log_loss(logits[0], target, backend=backend), "logits"),
        (lambda: exp_log_loss(logits, target[:, :2], backend=backend), "target"),
        (lambda: exp_log_loss(logits, target.float(), backend=backend), "target must hold integer labels"),
        (lambda: exp_log_loss(logits, target.bool(), backend=backend), "target must hold integer labels"),
        (lambda: exp_log_loss(logits.long(), target, backend=backend), "logits must be a floating-point"),
        (lambda: exp_log_loss(logits[:, :1], target, backend=backend), "at least 2 labels"),
        (lambda: exp_log_loss(logits, target, torch.ones(4), backend=backend), "weights must be"),
        (lambda: exp_log_loss(logits, target, -torch.ones(5), backend=backend), "weights must be"),
        (lambda: exp_log_loss(logits, target.to("meta"), backend=backend), "target is on meta"),
        (lambda: exp_log_loss(logits, target, gamma_dice=0.0, backend=backend), "gamma_dice"),
        (lambda: exp_log_loss(logits, target, w_dice=-1.0, backend=backend), "w_dice"),
        (lambda: exp_log_loss(logits, target, w_dice=0.0, w_cross=0.0, backend=backend), "both 0"),
        (lambda: exp_log_loss(logits, target, eps=float("nan"), backend=backend), "eps"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_label", [-1, 5, 200])
def test_labels_outside_range_raise(backend, bad_label):
    logits, target = inputs()
    target[1, 2, 3, 4] = bad_label
    target[0, 0, 0, 0] = bad_label
    with pytest.raises(ValueError, match=r"target: 2 voxels hold labels outside \[0, 5\)"):
        exp_log_loss(logits, target, backend=backend)


@pytest.mark.parametrize("backend", with_triton_designs(BACKENDS))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_raise_and_without_validation_give_nan(backend, value):
    backend = use_backend(backend)
    logits, target = inputs()
    logits[0, 3, 1, 1, 1] = value
    with pytest.raises(ValueError, match="logits: 1 voxels hold NaN or Inf"):
        exp_log_loss(logits, target, backend=backend)
    if backend != "reference":  # documented: any non-finite logit makes the fused losses NaN
        assert torch.isnan(exp_log_loss(logits, target, backend=backend, validate=False))
        assert torch.isnan(cross_loss(logits, target, backend=backend, validate=False))
        assert torch.isnan(log_dice_loss(logits, target, backend=backend, validate=False))


@pytest.mark.parametrize("backend", ["native", *(pytest.param(b, marks=needs_triton_cpu)
                                                  for b in with_triton_designs(["triton"]))])
def test_fused_backends_ignore_out_of_range_labels_without_validation(backend):
    backend = use_backend(backend)
    logits, target = inputs()
    bad = target.clone()
    bad[0, 0, 0, 0] = 99
    logits.requires_grad_(True)
    exp_log_loss(logits, bad, backend=backend, validate=False).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.count_nonzero(logits.grad[0, :, 0, 0, 0]) == 0


def test_native_op_passes_opcheck():
    for dtype, channels_last in [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                 (torch.float64, True)]:
        logits = make_logits((2, 4, 3, 2, 5), dtype, channels_last).requires_grad_(True)
        target = make_target((2, 4, 3, 2, 5), 4)
        args = (logits, target, torch.rand(4) + 0.5, *LossSpec().op_args())
        torch.library.opcheck(torch.ops.expseg_fast.explog_forward.default, args)


def test_native_coefficient_backward_passes_opcheck():
    """explog_coef_backward: the voxel pass from given (3, N, C) coefficients (losses/statistics.py)."""
    for dtype, channels_last in [(torch.float32, False), (torch.bfloat16, True), (torch.float64, True)]:
        logits = make_logits((2, 4, 3, 2, 5), dtype, channels_last)
        target = make_target((2, 4, 3, 2, 5), 4)
        coefs = torch.randn(3, 2, 4, dtype=torch.float64)
        torch.library.opcheck(torch.ops.expseg_fast.explog_coef_backward.default, (coefs, logits, target, 0.3))
        grad = torch.ops.expseg_fast.explog_coef_backward(coefs, logits, target, 0.3)
        assert grad.dtype == dtype and grad.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
    with pytest.raises(ValueError, match=r"coefs must be \(3, N, C\) float64"):
        torch.ops.expseg_fast.explog_coef_backward(coefs.float(), logits, target, 0.3)


@needs_triton_cpu
def test_triton_op_passes_opcheck():
    for dtype, channels_last in [(torch.float32, False), (torch.bfloat16, True)]:
        logits = make_logits((2, 4, 3, 2, 5), dtype, channels_last).requires_grad_(True)
        target = make_target((2, 4, 3, 2, 5), 4)
        args = (logits, target, torch.rand(4) + 0.5, *LossSpec().op_args(), False)
        torch.library.opcheck(torch.ops.expseg_fast.triton_explog_forward.default, args)


@needs_triton_cpu
def test_triton_rejects_float64_logits():
    logits, target = inputs()
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        exp_log_loss(logits.double(), target, backend="triton")


@pytest.mark.parametrize("backend", ["native", pytest.param("triton", marks=needs_triton_cpu)])
def test_fused_loss_under_torch_compile_without_graph_breaks(backend):
    logits, target = inputs()
    compiled = torch.compile(lambda z, t: exp_log_loss(z, t, backend=backend), fullgraph=True, backend="aot_eager")
    z1 = logits.clone().requires_grad_(True)
    z2 = logits.clone().requires_grad_(True)
    compiled(z1, target).backward()
    exp_log_loss(z2, target, backend=backend).backward()
    assert torch.allclose(z1.grad, z2.grad)


def test_auto_takes_only_deterministic_backends_in_deterministic_mode():
    from expseg_fast.losses.api import preference

    assert preference("cuda", False)[0] == "native"
    assert "native" not in preference("cuda", True) and preference("cuda", True)[0] == "triton"
    assert preference("cpu", True)[0] == "native"  # the CPU op reduces in a fixed order (thread-count tests)
    logits, target = inputs()
    torch.use_deterministic_algorithms(True)
    try:
        assert available_backends("cpu")[0] == "native"
        values = [loss(logits, target, None, LossSpec(), "auto") for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(values[0], values[1])
