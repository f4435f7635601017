"""The trilinear resampling op of the native extension (expseg_fast/models/upsample.py, csrc/upsample.*)
against F.interpolate in float64 (values and gradients): the network's factors 2 and 4, odd and unequal
sizes, downsampling, equal axes, one voxel, batch > 1; fp32 and bf16 in and out; gradcheck and opcheck;
what goes to F.interpolate instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expseg_fast.models import upsample as op
from expseg_fast.models.upsample import takes_the_op, upsample

pytestmark = pytest.mark.skipif("cpu" not in op.DEVICE_TYPES, reason="the native extension is not built")
CL = torch.channels_last_3d

CASES = [
    ((1, 33, 4, 4, 4), (16, 16, 16)),  # the fusion's factor 4, 33 labels
    ((1, 24, 8, 8, 8), (16, 16, 16)),  # the decoder's factor 2
    ((2, 5, 3, 7, 4), (8, 9, 4)),  # batch 2, unequal factors, one axis unchanged
    ((1, 3, 9, 5, 6), (4, 3, 7)),  # downsampling along two axes
    ((1, 7, 1, 1, 1), (3, 2, 5)),  # one voxel
    ((1, 1, 5, 6, 7), (10, 12, 14)),  # one channel
]


def _both(x: torch.Tensor, size, grad: torch.Tensor):
    ours_x, ref_x = x.detach().clone().requires_grad_(), x.detach().double().requires_grad_()
    ours = upsample(ours_x, size)
    ref = F.interpolate(ref_x, size=size, mode="trilinear", align_corners=False)
    ours.backward(grad.to(ours.dtype))
    ref.backward(grad.double())
    return ours, ours_x.grad, ref.detach(), ref_x.grad


@pytest.mark.parametrize("shape, size", CASES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["float64", "float32"])
def test_values_and_gradients_match_interpolate_in_float64(shape, size, dtype, tol):
    gen = torch.Generator().manual_seed(hash((shape, size)) % 2**31)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 5).to(dtype).contiguous(memory_format=CL)
    assert takes_the_op(x)
    grad = torch.randn(shape[:2] + size, generator=gen, dtype=torch.float64)
    y, gx, ref, ref_gx = _both(x, size, grad)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    assert gx.dtype == dtype and gx.shape == x.shape
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    torch.testing.assert_close(gx.double(), ref_gx, rtol=tol, atol=tol * ref_gx.abs().max().item())


@pytest.mark.parametrize("shape, size", CASES[:3])
def test_bf16_in_and_out_with_float_sums(shape, size):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen).bfloat16().contiguous(memory_format=CL)
    grad = torch.randn(shape[:2] + size, generator=gen).bfloat16().double()
    y, gx, ref, ref_gx = _both(x, size, grad)
    assert y.dtype == gx.dtype == torch.bfloat16
    # one bf16 rounding of a float sum: within half a bf16 ulp of the exact value, plus the input's own rounding
    torch.testing.assert_close(y.double(), ref, rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(gx.double(), ref_gx, rtol=2**-8, atol=2**-8 * ref_gx.abs().max().item())
    torch.testing.assert_close(y, F.interpolate(x, size=size, mode="trilinear", align_corners=False), rtol=2**-7,
                               atol=2**-7)


def test_gradcheck_and_opcheck():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 3, 4, 2, generator=gen, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: upsample(t, (6, 5, 4)), (x,))
    torch.library.opcheck(torch.ops.expseg_fast.upsample_trilinear_forward.default, (x, [6, 5, 4]))
    torch.library.opcheck(torch.ops.expseg_fast.upsample_trilinear_backward.default,
                          (torch.randn(2, 3, 6, 5, 4, generator=gen, dtype=torch.float64), [2, 3, 3, 4, 2]))


def test_a_non_channels_last_tensor_goes_to_interpolate_and_bad_input_is_refused():
    x = torch.randn(1, 4, 3, 3, 3)  # contiguous, 4 channels: not channels-last
    assert not takes_the_op(x) and not takes_the_op(x.int().contiguous(memory_format=CL))
    torch.testing.assert_close(upsample(x, (6, 6, 6)), F.interpolate(x, size=(6, 6, 6), mode="trilinear"))
    with pytest.raises(ValueError, match="size must be three positive edges"):
        torch.ops.expseg_fast.upsample_trilinear_forward(x.contiguous(memory_format=CL), [6, 6])
    with pytest.raises(ValueError, match="x must be"):
        torch.ops.expseg_fast.upsample_trilinear_forward(torch.randn(4, 3, 3, 3), [6, 6, 6])
    with pytest.raises(ValueError, match="input_size's"):
        torch.ops.expseg_fast.upsample_trilinear_backward(torch.randn(1, 4, 6, 6, 6), [1, 5, 3, 3, 3])
