"""The rigid augmentation (paper section 2.3)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from expseg_fast.config import TrainConfig
from expseg_fast.data.augment import augment, sampling_matrix

PAPER = TrainConfig().augment_config()  # the paper's augmentation


def point_volume(size=33, at=(20, 16, 16)):
    labels = torch.zeros(1, size, size, size, dtype=torch.long)
    labels[0, at[0] - 1 : at[0] + 2, at[1] - 1 : at[1] + 2, at[2] - 1 : at[2] + 2] = 3
    return labels


def centre_of(labels):
    idx = (labels[0] == 3).nonzero().float()
    return idx.mean(0)


def resample(labels, theta):
    grid = F.affine_grid(theta, [1, 1, *labels.shape[1:]], align_corners=False)
    return F.grid_sample(labels[:, None].float(), grid, mode="nearest", align_corners=False)[:, 0].long()


def test_rotation_turns_the_first_two_axes_about_the_axial_one():
    labels = point_volume()
    out = resample(labels, sampling_matrix(torch.tensor([math.radians(30.0)]), torch.zeros(1, 3), torch.ones(1)))
    before, after = centre_of(labels) - 16, centre_of(out) - 16
    assert torch.isclose(after[2], before[2], atol=0.5)  # the axial coordinate stays
    assert torch.isclose(after.norm(), before.norm(), atol=1.0)  # a rotation
    angle = math.degrees(math.atan2(after[1], after[0]) - math.atan2(before[1], before[0]))
    assert abs(abs(angle) - 30.0) < 4.0


def test_shift_and_scale():
    labels = point_volume(at=(20, 16, 16))
    shifted = resample(labels, sampling_matrix(torch.zeros(1), torch.tensor([[0.1, 0.0, 0.0]]), torch.ones(1)))
    assert torch.isclose(centre_of(shifted)[0] - centre_of(labels)[0], torch.tensor(3.3), atol=0.6)
    scaled = resample(labels, sampling_matrix(torch.zeros(1), torch.zeros(1, 3), torch.tensor([1.2])))
    assert torch.isclose(centre_of(scaled)[0] - 16, torch.tensor(4.0 * 1.2), atol=0.6)


def test_augment_is_seeded_aligned_and_keeps_label_values():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (3, 16, 16, 16))
    images = labels[:, None].float() * 10
    out1 = augment(images, labels, torch.Generator().manual_seed(5), PAPER)
    out2 = augment(images, labels, torch.Generator().manual_seed(5), PAPER)
    out3 = augment(images, labels, torch.Generator().manual_seed(6), PAPER)
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    assert not torch.equal(out1[1], out3[1])
    assert set(out1[1].unique().tolist()) <= {0, 1, 2, 3} and out1[1].dtype == labels.dtype
    # image and labels come from one grid: where the image is exactly a label value, they agree
    exact = (out1[0][:, 0] % 10 == 0)
    assert (out1[0][:, 0][exact] / 10 == out1[1][exact]).float().mean() > 0.99


def test_probability_zero_is_the_identity():
    labels = torch.randint(0, 4, (2, 8, 8, 8))
    images = torch.randn(2, 1, 8, 8, 8)
    never = dataclasses.replace(PAPER, probability=0.0)
    out_images, out_labels = augment(images, labels, torch.Generator().manual_seed(0), never)
    assert torch.allclose(out_images, images, atol=1e-5) and torch.equal(out_labels, labels)


def test_bad_shapes():
    with pytest.raises(ValueError, match="expected"):
        augment(torch.randn(2, 1, 8, 8, 8), torch.zeros(2, 8, 8, 4, dtype=torch.long), torch.Generator(), PAPER)
