"""CUDA backends against the float64 oracle and the CPU native op (run by the GPU suite)."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    SPECS,
    assert_grad_close,
    loss_and_grad,
    make_logits,
    make_target,
    mp_loss_and_grad,
    oracle_loss,
    rel_err,
    use_backend,
    with_triton_designs,
)

from expseg_fast.losses import LossSpec, available_backends, loss

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA_BACKENDS = available_backends("cuda") if torch.cuda.is_available() else []
VARIANTS = with_triton_designs(CUDA_BACKENDS)  # the Triton kernels in both designs
TOL = {torch.float32: (2e-6, 2e-5), torch.bfloat16: (2e-6, 1e-2), torch.float16: (2e-6, 2e-3)}


def test_native_cuda_kernels_are_built():
    assert "native" in CUDA_BACKENDS, "the extension must be built with its CUDA kernels on a GPU machine"


@pytest.mark.parametrize("backend", VARIANTS)
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("shape", [(1, 2, 3, 5, 7), (2, 5, 9, 8, 7), (2, 20, 5, 6, 33)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "cl3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_float64_oracle(backend, spec_name, shape, channels_last, dtype):
    backend = use_backend(backend)
    spec = SPECS[spec_name]
    logits = make_logits(shape, dtype, channels_last)
    target = make_target(shape, shape[1])
    weights = torch.rand(shape[1]) + 0.5
    value, grad = loss_and_grad(lambda z: loss(z, target.cuda(), weights.cuda(), spec, backend), logits.cuda())
    ref_value, ref_grad = loss_and_grad(lambda z: oracle_loss(z, target, weights, spec), logits.double())
    loss_tol, grad_tol = TOL[dtype]
    assert value.device.type == "cuda" and value.dtype == torch.float32
    assert abs(float(value) - float(ref_value)) <= 10 * loss_tol * abs(float(ref_value)) + 1e-6
    assert grad.dtype == dtype and grad.stride() == logits.stride()
    assert_grad_close(grad, ref_grad, grad_tol)


@pytest.mark.parametrize("backend", VARIANTS)
@pytest.mark.parametrize("gamma", [0.1, 0.3, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_saturated_logits(backend, gamma, dtype):
    backend = use_backend(backend)
    from test_loss_numerics import saturated_logits

    target = make_target((2, 6, 4, 5, 3), 5)
    logits = saturated_logits(target, 6, 100.0, 0.3, dtype)
    spec = LossSpec.exp_log(gamma_dice=gamma, gamma_cross=gamma)
    weights = torch.rand(6) + 0.5
    value, grad = loss_and_grad(lambda z: loss(z, target.cuda(), weights.cuda(), spec, backend), logits.cuda())
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    ref_value, ref_grad = mp_loss_and_grad(logits, target, weights, spec)
    assert abs(float(value) - ref_value) <= 1e-5 * abs(ref_value) + 1e-7
    rtol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    root_n = grad.numel() ** 0.5
    resolution = (4 * torch.finfo(dtype).tiny + 1e-5 / target.numel()) * root_n
    assert float((grad.cpu().double() - ref_grad).norm()) <= rtol * float(ref_grad.norm()) + resolution


@pytest.mark.parametrize("backend", VARIANTS)
def test_cuda_large_volume_matches_cpu_native(backend):
    backend = use_backend(backend)
    shape = (1, 20, 64, 64, 64)
    logits = make_logits(shape, torch.float32)
    target = make_target(shape, 20)
    cpu_value, cpu_grad = loss_and_grad(lambda z: loss(z, target, None, LossSpec(), "native"), logits)
    value, grad = loss_and_grad(lambda z: loss(z, target.cuda(), None, LossSpec(), backend), logits.cuda())
    assert abs(float(value) - float(cpu_value)) <= 1e-5 * float(cpu_value)
    assert rel_err(grad.cpu(), cpu_grad) < 1e-5


@pytest.mark.parametrize("backend", VARIANTS)
def test_cuda_bad_values_raise(backend):
    backend = use_backend(backend)
    logits, target = make_logits((1, 4, 3, 3, 3)).cuda(), make_target((1, 4, 3, 3, 3), 4).cuda()
    bad = target.clone()
    bad[0, 1, 1, 1] = 4
    with pytest.raises(ValueError, match="target: 1 voxels"):
        loss(logits, bad, None, LossSpec(), backend)
    logits[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits: 1 voxels"):
        loss(logits, target, None, LossSpec(), backend)
    assert torch.isnan(loss(logits, target, None, LossSpec(), backend, validate=False))


def test_native_cuda_opcheck():
    logits = make_logits((2, 5, 3, 4, 5)).cuda().requires_grad_(True)
    target = make_target((2, 5, 3, 4, 5), 5).cuda()
    args = (logits, target, torch.rand(5, device="cuda") + 0.5, *LossSpec().op_args())
    # float64 atomics make the statistics order-dependent in the last bits
    torch.library.opcheck(torch.ops.expseg_fast.explog_forward.default, args, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("design", ["triton", "triton-rows"])
def test_triton_cuda_deterministic_mode(design):
    from test_loss_numerics import check_triton_determinism

    use_backend(design)
    check_triton_determinism("cuda")


def test_triton_cuda_opcheck_and_compile():
    logits = make_logits((2, 5, 3, 4, 5), torch.bfloat16, True).cuda().requires_grad_(True)
    target = make_target((2, 5, 3, 4, 5), 5).cuda()
    args = (logits, target, torch.rand(5, device="cuda") + 0.5, *LossSpec().op_args(), True)  # deterministic
    torch.library.opcheck(torch.ops.expseg_fast.triton_explog_forward.default, args)
    compiled = torch.compile(lambda z, t: loss(z, t, None, LossSpec(), "triton"), fullgraph=True)
    z1 = logits.detach().clone().requires_grad_(True)
    z2 = logits.detach().clone().requires_grad_(True)
    compiled(z1, target).backward()
    loss(z2, target, None, LossSpec(), "triton").backward()
    assert torch.allclose(z1.grad.float(), z2.grad.float())


def test_deterministic_mode_native_refuses_and_auto_takes_triton():
    logits = make_logits((2, 5, 9, 8, 7)).cuda()
    target = make_target((2, 5, 9, 8, 7), 5).cuda()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            loss(logits, target, None, LossSpec(), "native")
        assert available_backends("cuda")[0] == "triton"
        runs = [loss_and_grad(lambda z: loss(z, target, None, LossSpec(), "auto"), logits) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    for value, grad in runs[1:]:
        assert torch.equal(value, runs[0][0]) and torch.equal(grad, runs[0][1])
