"""The network's convolutions (expseg_fast/models/conv.py): the same function as F.conv3d (float64 reference,
values and every gradient), layouts kept, and the backend they exist for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from expseg_fast.models.conv import ONEDNN_MIN_ROWS, Conv3d, conv3d, takes_channel_scale, takes_two_slabs

CL = torch.channels_last_3d
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _check_against_float64(shape, out_channels, kernel, memory_format, bias=True):
    gen = torch.Generator().manual_seed(hash((shape, out_channels, kernel)) % 2**31)
    x = (torch.randn(shape, generator=gen) + 3.0).contiguous(memory_format=memory_format).requires_grad_()
    weight = torch.randn(out_channels, shape[1], *kernel, generator=gen).contiguous(memory_format=memory_format)
    weight.requires_grad_()
    b = torch.randn(out_channels, generator=gen).requires_grad_() if bias else None
    padding = tuple(k // 2 for k in kernel)
    y = conv3d(x, weight, b, padding)
    grad = torch.randn(y.shape, generator=gen)
    y.backward(grad)
    leaves = [t for t in (x, weight, b) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = F.conv3d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias else None, padding=padding)
    ref.backward(grad.double())
    scale = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-5, atol=1e-5 * scale)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5 * want.grad.abs().max().item())
    return x, y


@pytest.mark.parametrize("memory_format", [CL, torch.contiguous_format], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("shape, out_channels, kernel", [
    ((1, 1, 8, 8, 8), 4, (3, 3, 3)),  # one input channel: the first level's
    ((1, 6, 16, 12, 10), 5, (3, 3, 3)),  # D, H, W unequal
    ((1, 4, 2, 3, 5), 3, (3, 3, 3)),  # two planes: each slab is one plane and its neighbour
    ((1, 6, 12, 8, 8), 7, (1, 1, 1)),  # the skip's 1x1x1
    ((1, 1, 12, 8, 6), 7, (1, 1, 1)),  # the first skip's 1x1x1 of one channel: a channel scale
    ((3, 1, 5, 7, 1), 2, (1, 1, 1)),  # the same, a batch and odd, flat extents
    ((1, 3, 8, 5, 5), 2, (3, 1, 3)),  # a kernel of unequal edges
    ((1, 5, 7, 8, 8), 4, (3, 3, 3)),  # odd D: F.conv3d
    ((2, 4, 8, 8, 8), 4, (3, 3, 3)),  # a batch: F.conv3d
    ((1, 16, 40, 34, 8), 4, (3, 3, 3)),  # N C D H above ONEDNN_MIN_ROWS: F.conv3d
])
def test_the_same_function_as_conv3d_with_every_gradient(shape, out_channels, kernel, memory_format):
    x, y = _check_against_float64(shape, out_channels, kernel, memory_format)
    if out_channels > 1 and shape[1] > 1 and takes_two_slabs(x, torch.empty(out_channels, shape[1], *kernel)):
        assert y.is_contiguous(memory_format=memory_format), "the input's layout is the output's"


def test_without_bias_and_under_no_grad():
    _check_against_float64((1, 3, 6, 6, 6), 4, (3, 3, 3), CL, bias=False)
    x, w = torch.randn(1, 3, 6, 6, 6), torch.randn(4, 3, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(conv3d(x, w, None, (1, 1, 1)), F.conv3d(x, w, padding=1), rtol=1e-5, atol=1e-5)


def test_the_channel_scale_without_bias_and_for_one_voxel():
    _check_against_float64((1, 1, 8, 6, 4), 5, (1, 1, 1), CL, bias=False)
    _check_against_float64((2, 1, 1, 1, 1), 3, (1, 1, 1), torch.contiguous_format)


def test_which_convolutions_take_the_channel_scale():
    x, w = torch.empty(1, 1, 8, 8, 8), torch.empty(12, 1, 1, 1, 1)
    assert takes_channel_scale(x, w, (0, 0, 0))
    assert not takes_channel_scale(torch.empty(1, 2, 8, 8, 8), torch.empty(12, 2, 1, 1, 1), (0, 0, 0))
    assert not takes_channel_scale(x, torch.empty(12, 1, 3, 3, 3), (1, 1, 1))
    assert not takes_channel_scale(x, w, (1, 1, 1))  # padded: a border of the bias alone, F.conv3d's
    assert not takes_channel_scale(x.double(), w.double(), (0, 0, 0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's convolution computes in bf16
        assert not takes_channel_scale(x, w, (0, 0, 0))
    y = conv3d(torch.randn(1, 1, 4, 4, 4), torch.randn(12, 1, 1, 1, 1), torch.randn(12), (0, 0, 0))
    assert y.is_contiguous(memory_format=CL), "written channels-last, as the network's other convolutions"


def test_which_convolutions_take_two_slabs():
    w3, w1 = torch.empty(8, 8, 3, 3, 3), torch.empty(8, 8, 1, 1, 1)
    rows_edge = ONEDNN_MIN_ROWS // (8 * 16)  # D with N C D H at the threshold (H = 16)
    assert takes_two_slabs(torch.empty(1, 8, 16, 16, 16), w3) is torch.backends.mkldnn.is_available()
    assert takes_two_slabs(torch.empty(1, 8, 16, 16, 16), w1) is torch.backends.mkldnn.is_available()
    assert not takes_two_slabs(torch.empty(1, 8, rows_edge + 2, 16, 16), w3)  # PyTorch's oneDNN already
    assert not takes_two_slabs(torch.empty(2, 8, 16, 16, 16), w3)  # a batch: oneDNN already
    assert not takes_two_slabs(torch.empty(1, 8, 15, 16, 16), w3)  # odd D
    assert not takes_two_slabs(torch.empty(1, 8, 16, 16, 16, dtype=torch.float64), w3.double())
    assert not takes_two_slabs(torch.empty(1, 8, 16, 16, 16, dtype=torch.bfloat16), w3.bfloat16())
    assert not takes_two_slabs(torch.empty(1, 8, 16, 16, 16), torch.empty(8, 8, 5, 5, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the image is fp32, its convolution bf16: oneDNN's
        assert not takes_two_slabs(torch.empty(1, 8, 16, 16, 16), w3)


def _backends(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key in ("aten::mkldnn_convolution", "aten::slow_conv3d_forward")}


@needs_onednn
def test_the_slabs_reach_onednn_where_conv3d_does_not():
    """Why the module exists: should PyTorch change its choice, the first assertion says the slabs are stale."""
    x, w = torch.randn(1, 12, 32, 32, 32).contiguous(memory_format=CL), torch.randn(24, 12, 3, 3, 3)
    w = w.contiguous(memory_format=CL)
    assert _backends(lambda: F.conv3d(x, w, padding=1)) == {"aten::slow_conv3d_forward"}
    assert _backends(lambda: conv3d(x, w, None, (1, 1, 1))) == {"aten::mkldnn_convolution"}


def test_the_module_is_nn_conv3d_with_the_same_keys_and_outputs():
    stock = nn.Conv3d(3, 5, 3, padding=1)
    ours = Conv3d(3, 5, 3, padding=1)
    ours.load_state_dict(stock.state_dict())
    assert isinstance(ours, nn.Conv3d) and list(ours.state_dict()) == list(stock.state_dict())
    x = torch.randn(1, 3, 8, 6, 6)
    torch.testing.assert_close(ours(x), stock(x), rtol=1e-5, atol=1e-5)
    strided = Conv3d(3, 5, 3, padding=1, stride=2)  # not stride 1: the stock path
    strided.load_state_dict(stock.state_dict())
    torch.testing.assert_close(strided(x), F.conv3d(x, stock.weight, stock.bias, stride=2, padding=1))
