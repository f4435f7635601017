"""bench/grid_bound.py: what a grid costs a perfect model, on label volumes whose answer is known."""

from __future__ import annotations

import numpy as np

from bench.grid_bound import bound
from expseg_fast.data.preprocess import IGNORE


def test_blocks_on_the_coarse_grid_are_kept_and_a_lone_voxel_is_lost():
    classes = np.zeros((16, 16, 16), np.uint8)
    classes[:8] = 1  # half the volume: whole 2 mm voxels, kept exactly
    classes[10:14, 2:6, 4:8] = 2  # 2 x 2 x 2 coarse voxels: trilinear upsampling rounds off its corners
    classes[12:14, 10:12, 12:14] = 3  # one coarse voxel: 0.75^3 at best after upsampling, below the background
    classes[15, 15, 15] = IGNORE  # not scored
    dice = bound(classes, np.array([1.0, 1.0, 1.0]), 2.0, 5)
    assert dice[1] == 1.0 and dice[3] == 0.0 and np.isnan(dice[4])
    assert 0.5 < dice[2] < 1.0
    assert bound(classes, np.array([1.0, 1.0, 1.0]), 1.0, 5)[:4] == [1.0, 1.0, 1.0, 1.0]  # the labels' own grid
