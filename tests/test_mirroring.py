"""Test-time flip averaging (issue 35): the lateral classes' swap, the grid's left-right axis, and the
averaged softmax's defining property — segmenting the mirrored window gives the mirror of the window's
segmentation, lateral classes exchanged — on a random network that has no symmetry of its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from expseg_fast.inference.mirroring import lateral_swap, left_right_axis, mirrored


def test_left_and_right_classes_are_paired_by_name():
    names = ["background", "Left-Thalamus", "right hippocampus", "brainstem", "Right-Thalamus", "left hippocampus",
             "left amygdala", "right_caudate", "left_caudate"]
    assert lateral_swap(names) == [0, 4, 5, 3, 1, 2, 6, 8, 7]  # the amygdala lacks its twin: it stays
    assert lateral_swap(["background", "thalamus", "leftover", "cerebral grey"]) is None


@pytest.mark.parametrize("seed", range(4))
def test_the_left_right_axis_follows_the_affine(seed):
    rng = np.random.default_rng(seed)
    order = rng.permutation(3)
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[:, order] * rng.choice([-1, 1], 3) * rng.uniform(0.5, 3, 3)
    angle = rng.uniform(-0.3, 0.3)  # a small rotation about the superior axis keeps the answer
    turn = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine[:3, :3] = turn @ affine[:3, :3]
    assert left_right_axis(affine) == int(np.nonzero(order == 0)[0][0])


@pytest.mark.parametrize("axis, swap", [(0, None), (1, [0, 2, 1, 3]), (2, [0, 1, 2, 3])])
def test_the_averaged_softmax_commutes_with_the_mirror(axis, swap):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    net = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 4, 3, padding=1))
    probabilities = lambda w: torch.softmax(net(w), dim=1)  # noqa: E731
    averaged = mirrored(probabilities, axis, swap)
    x = torch.randn(2, 1, 6, 7, 8)
    with torch.no_grad():
        plain, found, of_mirror = probabilities(x), averaged(x), averaged(x.flip(2 + axis))
    expected = found.flip(2 + axis)
    expected = expected[:, swap] if swap is not None else expected
    torch.testing.assert_close(of_mirror, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(found.sum(1), torch.ones_like(found[:, 0]))
    assert (found - plain).abs().max() > 1e-3  # the network is not symmetric: averaging changed something
