"""Every CPU backend of the loss against the independent float64 oracle and against autograd."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    SPECS,
    assert_grad_close,
    loss_and_grad,
    make_logits,
    make_target,
    oracle_loss,
    use_backend,
    with_triton_designs,
)

from expseg_fast.losses import available_backends, loss

BACKENDS = available_backends("cpu")
F64_BACKENDS = [b for b in BACKENDS if b != "triton"]  # the Triton kernels compute in float32
SHAPES = [(1, 2, 3, 5, 7), (2, 5, 4, 3, 5), (1, 20, 3, 4, 5), (2, 20, 5, 1, 3)]
# (loss relative error, gradient relative error) by logits dtype; the gradient is rounded to it.
TOL = {torch.float32: (2e-6, 2e-5), torch.bfloat16: (2e-6, 1e-2), torch.float16: (2e-6, 2e-3)}


def test_native_and_triton_backends_are_tested():
    assert "native" in BACKENDS, "the C++ extension must be built for the tests (pip install --no-build-isolation -e .)"
    if torch.cuda.is_available():  # the Triton kernels are tested on the GPU (tests/test_loss_cuda.py)
        assert "triton" in available_backends("cuda")
    else:
        assert "triton" in BACKENDS, "triton must be installed; the tests run its kernels under TRITON_INTERPRET=1"


@pytest.mark.parametrize("backend", with_triton_designs(BACKENDS))
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "cl3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_float64_oracle(backend, spec_name, shape, channels_last, dtype):
    backend = use_backend(backend)
    spec = SPECS[spec_name]
    logits = make_logits(shape, dtype, channels_last)
    target = make_target(shape, shape[1])
    weights = torch.rand(shape[1]) + 0.5
    value, grad = loss_and_grad(lambda z: loss(z, target, weights, spec, backend), logits)
    ref_value, ref_grad = loss_and_grad(lambda z: oracle_loss(z, target, weights, spec), logits.double())
    loss_tol, grad_tol = TOL[dtype]
    assert value.dtype == torch.float32 and value.shape == ()
    assert abs(value.double() - ref_value) <= loss_tol * abs(ref_value) + 1e-7
    assert grad.dtype == dtype and grad.stride() == logits.stride()
    assert torch.isfinite(grad).all()
    assert_grad_close(grad, ref_grad, grad_tol)


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_gradcheck_float64(backend, spec_name):
    spec = SPECS[spec_name]
    shape = (2, 4, 3, 2, 3)
    logits = make_logits(shape, torch.float64, scale=1.0).requires_grad_(True)
    target = make_target(shape, shape[1])
    weights = torch.rand(shape[1], dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda z: loss(z, target, weights, spec, backend), (logits,), atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_gradient_matches_oracle_finite_differences(backend, spec_name):
    """Directional derivative of the float64 oracle by central differences vs the backend's gradient."""
    spec = SPECS[spec_name]
    shape = (1, 5, 3, 3, 3)
    logits = make_logits(shape, torch.float64)
    target = make_target(shape, shape[1])
    weights = torch.rand(shape[1], dtype=torch.float64) + 0.5
    _, grad = loss_and_grad(lambda z: loss(z, target, weights, spec, backend), logits)
    direction = torch.randn_like(logits)
    h = 1e-5
    plus = oracle_loss(logits + h * direction, target, weights, spec)
    minus = oracle_loss(logits - h * direction, target, weights, spec)
    fd = float((plus - minus) / (2 * h))
    assert abs(float((grad * direction).sum()) - fd) <= 1e-6 * abs(fd) + 1e-10


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "cl3d"])
def test_the_native_and_triton_ops_keep_the_same_state_and_read_each_others(spec_name, channels_last):
    """One contract (expseg_fast/op_contract.py): the same outputs with the same dtypes, the same tensors
    saved for the backward, and each backward op takes the other's statistics."""
    from expseg_fast.kernels import explog as triton_op

    shape, spec = (2, 5, 3, 4, 5), SPECS[spec_name]
    logits = make_logits(shape, torch.float32, channels_last).requires_grad_()
    target, weights = make_target(shape, shape[1]), torch.rand(shape[1]) + 0.5
    forwards = {"native": lambda: torch.ops.expseg_fast.explog_forward(logits, target, weights, *spec.op_args()),
                "triton": lambda: triton_op.explog_forward(logits, target, weights, *spec.op_args(), True)}
    outputs, saved = {}, {}
    for name, forward in forwards.items():
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            outputs[name] = forward()
        saved[name] = kept
    assert [(t.dtype, t.shape) for t in outputs["native"]] == [(t.dtype, t.shape) for t in outputs["triton"]]
    assert [(t.dtype, t.shape) for t in saved["native"]] == [(t.dtype, t.shape) for t in saved["triton"]]
    assert [t.dtype for t in saved["native"]][-1] == torch.float64 and len(saved["native"]) == 4  # + statistics
    (loss_n, stats_n, bad_n), (loss_t, stats_t, bad_t) = outputs["native"], outputs["triton"]
    torch.testing.assert_close(stats_t, stats_n, rtol=1e-5, atol=1e-6)
    assert torch.equal(bad_n, bad_t)
    torch.testing.assert_close(loss_t.detach(), loss_n.detach(), rtol=1e-5, atol=0)
    grad = torch.tensor(0.7)
    args = (logits.detach(), target, weights)
    native_grad = torch.ops.expseg_fast.explog_backward(grad, *args, stats_n, *spec.op_args())
    triton_grad = triton_op.explog_backward(grad, *args, stats_n, *spec.op_args(), True)
    assert_grad_close(triton_grad, native_grad, 2e-5)
    assert_grad_close(torch.ops.expseg_fast.explog_backward(grad, *args, stats_t, *spec.op_args()), native_grad, 2e-5)
