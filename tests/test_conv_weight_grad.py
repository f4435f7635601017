"""The native weight gradient of the network's fp32 CPU convolutions (expseg_fast::conv3d_weight_grad,
csrc/conv_weight_grad.*, and _SameConv3d in expseg_fast/models/conv.py) against F.conv3d's autograd in
float64: every register tile's path (channel counts of 1 to 44 on either side, both orientations), batch 2,
kernels 1, 3, 5 and unequal, grids smaller than the kernel, both layouts; gradcheck and opcheck; which
convolutions take it; one-line refusals; a few training steps of the network equal to PyTorch's backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expseg_fast.models import conv
from expseg_fast.models.conv import conv3d, takes_weight_op
from expseg_fast.models.explog_net import ExpLogNet, NetConfig

pytestmark = pytest.mark.skipif("cpu" not in conv.DEVICE_TYPES, reason="the native extension is not built")
CL = torch.channels_last_3d
op = torch.ops.expseg_fast.conv3d_weight_grad

CASES = [  # (N, C in, O out, D, H, W, kernel)
    (1, 36, 12, 8, 9, 10, (3, 3, 3)),  # the decoder's 36 -> 12: B = x, 24 lanes + 12; A rows 4 x 3
    (1, 12, 24, 6, 7, 5, (3, 3, 3)),  # O > C: B = grad_y (24 lanes), offsets negated
    (1, 1, 12, 8, 8, 8, (3, 3, 3)),  # the first level's one input channel
    (2, 5, 7, 5, 6, 7, (3, 3, 3)),  # batch 2; 7 lanes: 4 + 3 single; A rows 4 + 1
    (1, 44, 6, 4, 5, 6, (3, 3, 3)),  # 24 + 20 lanes; A rows 4 + 2
    (1, 3, 16, 4, 4, 4, (3, 3, 3)),  # 16 lanes; A rows 3
    (1, 8, 2, 3, 4, 5, (3, 3, 3)),  # 8 lanes
    (1, 4, 4, 3, 3, 3, (3, 3, 3)),  # 4 lanes
    (1, 36, 12, 8, 8, 8, (1, 1, 1)),  # the skip's 1x1x1: a whole plane is one row
    (1, 6, 9, 5, 4, 7, (3, 1, 3)),  # unequal kernel edges
    (1, 3, 5, 2, 3, 4, (5, 5, 5)),  # offsets past the grid on every axis
    (1, 2, 3, 1, 1, 1, (3, 3, 3)),  # one voxel: only the centre tap sees it
]


def _reference(grad_y: torch.Tensor, x: torch.Tensor, kernel) -> torch.Tensor:
    """dL/dw by F.conv3d's autograd in float64."""
    x64 = x.detach().double()
    w = torch.zeros(grad_y.shape[1], x.shape[1], *kernel, dtype=torch.float64, requires_grad=True)
    y = F.conv3d(x64, w, padding=tuple(k // 2 for k in kernel))
    (grad_w,) = torch.autograd.grad(y, w, grad_y.double())
    return grad_w


def _case_id(case) -> str:
    n, c, o, d, h, w, kernel = case
    return f"{n}x{c}-{o}@{d}x{h}x{w}k{''.join(map(str, kernel))}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["channels_last", "contiguous"])
def test_the_weight_gradient_of_f_conv3d_in_float64(case, dtype, tol, layout):
    n, c, o, d, h, w, kernel = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    x = (torch.randn(n, c, d, h, w, generator=gen, dtype=torch.float64) + 2).to(dtype).contiguous(memory_format=layout)
    grad_y = torch.randn(n, o, d, h, w, generator=gen, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)
    got = op(grad_y, x, list(kernel))
    want = _reference(grad_y, x, kernel)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_a_large_offset_in_float32():
    """x around 1e4: the sums of one plane in float32, across planes in float64."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(1, 12, 16, 16, 16, generator=gen) + 1e4).contiguous(memory_format=CL)
    grad_y = torch.randn(1, 24, 16, 16, 16, generator=gen).contiguous(memory_format=CL)
    want = _reference(grad_y, x, (3, 3, 3))
    torch.testing.assert_close(op(grad_y, x, [3, 3, 3]).double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_of_the_convolution_and_opcheck(bias):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 4, 3, 5, generator=gen, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(4, 3, 3, 3, 3, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_() if bias else None
    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(
        lambda *t: conv._SameConv3d.apply(t[0], t[1], t[2] if bias else None, (1, 1, 1)), inputs)
    grad_y = torch.randn(2, 4, 4, 3, 5, generator=gen, dtype=torch.float64)
    torch.library.opcheck(op.default, (grad_y, x.detach(), [3, 3, 3]))
    torch.library.opcheck(op.default, (grad_y.float().contiguous(memory_format=CL), x.detach().float(), [1, 3, 1]))


def test_conv3d_takes_it_for_fp32_cpu_training_only():
    x = torch.randn(1, 4, 8, 8, 8).requires_grad_()
    w3, w1 = torch.randn(6, 4, 3, 3, 3), torch.randn(6, 4, 1, 1, 1)
    assert takes_weight_op(x, w3, (1, 1, 1)) and takes_weight_op(x, w1, (0, 0, 0))
    assert not takes_weight_op(x, w3, (0, 1, 1))  # not "same" padding
    assert not takes_weight_op(x, torch.randn(6, 4, 2, 2, 2), (1, 1, 1))  # even kernel
    assert not takes_weight_op(x.detach(), w3, (1, 1, 1))  # nothing to differentiate
    assert not takes_weight_op(x.double(), w3.double(), (1, 1, 1))  # float64 keeps PyTorch's backward
    assert not takes_weight_op(x.bfloat16(), w3.bfloat16(), (1, 1, 1))
    with torch.no_grad():
        assert not takes_weight_op(x, w3, (1, 1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 convolutions are oneDNN's own
        assert not takes_weight_op(x, w3, (1, 1, 1))
    y = conv3d(x, w3.requires_grad_(), None, (1, 1, 1))
    assert type(y.grad_fn).__name__ == "_SameConv3dBackward"


def test_bad_input_is_refused_in_one_line():
    x, g = torch.randn(1, 4, 5, 5, 5), torch.randn(1, 6, 5, 5, 5)
    with pytest.raises(ValueError, match="grad_y must have x's batch and grid"):
        op(torch.randn(1, 6, 5, 5, 4), x, [3, 3, 3])
    with pytest.raises(ValueError, match="kernel must be three odd positive edges"):
        op(g, x, [2, 3, 3])
    with pytest.raises(ValueError, match="kernel must be three odd positive edges"):
        op(g, x, [3, 3])
    with pytest.raises(ValueError, match="one dtype"):
        op(g.double(), x, [3, 3, 3])
    with pytest.raises(ValueError, match="float32 or float64"):
        op(g.bfloat16(), x.bfloat16(), [3, 3, 3])
    with pytest.raises(ValueError, match=r"must be \(N, C, D, H, W\)"):
        op(g[0], x[0], [3, 3, 3])


def test_training_steps_equal_pytorchs_backward(monkeypatch):
    """Four NAdam steps of a small network, channels-last fp32: the native weight gradient against PyTorch's
    backward (the same function; float rounding only)."""
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(2, 1, 16, 16, 16, generator=gen).contiguous(memory_format=CL)
    target = torch.randint(0, 5, (2, 16, 16, 16), generator=gen)

    def train(native: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(conv, "DEVICE_TYPES", frozenset({"cpu"}) if native else frozenset())
        torch.manual_seed(0)
        model = ExpLogNet(NetConfig(num_labels=5, width=4, norm="instance", dropout=0.0, noise_std=0.0))
        model = model.to(memory_format=CL)
        optimizer = torch.optim.NAdam(model.parameters(), lr=1e-3)
        for _ in range(4):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(image), target)
            loss.backward()
            optimizer.step()
        kinds = {type(node).__name__ for node in _graph(model(image).sum().grad_fn)}
        assert ("_SameConv3dBackward" in kinds) is native
        return [p.detach().clone() for p in model.parameters()]

    for got, want in zip(train(True), train(False)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _graph(node, seen=None):
    """Every node of an autograd graph."""
    seen = set() if seen is None else seen
    if node is not None and node not in seen:
        seen.add(node)
        for child, _ in node.next_functions:
            _graph(child, seen)
    return seen
