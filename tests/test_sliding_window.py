"""Sliding-window inference against the answer a perfect per-voxel model gives, on grids that the
windows do not tile evenly; and the `spacing` preprocessing's geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expseg_fast.data.preprocess import apply_labels, foreground_centre, plan_spacing, plan_spacing_whole
from expseg_fast.sliding_window import gaussian_weights, sliding_window_labels, window_starts


def test_window_starts_cover_every_voxel_and_end_at_the_end():
    for length in (16, 17, 23, 40, 41):
        starts = window_starts(length, 16)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + 16] = True
        assert covered.all() and starts[0] == 0 and starts[-1] == length - 16
        assert all(b - a <= 8 for a, b in zip(starts, starts[1:]))  # half overlap
    with pytest.raises(ValueError, match="shorter than the window"):
        window_starts(10, 16)


def test_gaussian_weights_peak_in_the_centre_and_never_vanish():
    w = gaussian_weights(16)
    assert w.shape == (16, 16, 16) and float(w.max()) == pytest.approx(1.0, rel=0.05)
    assert float(w.min()) > 0 and w[8, 8, 8] > w[0, 8, 8] > w[0, 0, 0]


@pytest.mark.parametrize("grid", [(16, 16, 16), (20, 27, 33), (41, 17, 16)])
@pytest.mark.parametrize("batch", [1, 3])
def test_sliding_window_labels_match_a_per_voxel_model(grid, batch):
    truth = torch.randint(0, 3, grid)
    image = torch.stack([(truth == c).float() for c in range(3)])  # (K=3, ...): the answer, one-hot

    def probabilities(windows):  # a perfect model that only sees its window
        assert windows.shape == (batch, 3, 16, 16, 16)
        return torch.softmax(20 * windows, dim=1)

    assert torch.equal(sliding_window_labels(probabilities, image, 16, batch, num_labels=3), truth)


def test_spacing_plan_has_the_asked_voxel_size_and_centres_the_foreground():
    rng = np.random.default_rng(7)
    affine = np.array([[0, 0, -2.0, 50], [1.5, 0, 0, -10], [0, 1.0, 0, 3], [0, 0, 0, 1]])  # permuted, flipped
    labels = np.zeros((40, 60, 30), np.uint8)
    lo = rng.integers(5, 15, 3)
    labels[lo[0]:lo[0] + 8, lo[1]:lo[1] + 8, lo[2]:lo[2] + 8] = 1
    centre = foreground_centre(labels)
    r = plan_spacing(labels.shape, affine, (16, 16, 16), 2.0, centre)
    assert np.allclose(np.linalg.norm(r.target_affine[:3, :3], axis=0), 2.0)
    assert np.allclose(r.target_affine @ [7.5, 7.5, 7.5, 1], affine @ [*centre, 1])  # the cube's centre
    out = apply_labels(labels, r)
    assert np.allclose(np.argwhere(out).mean(axis=0), 7.5, atol=1.0)
    whole = plan_spacing_whole(labels.shape, affine, 16, 2.0)  # 60 mm along every world axis
    assert whole.target_shape == (30, 30, 30)
    assert apply_labels(labels, whole).sum() == pytest.approx(labels.sum() * (1.5 * 1.0 * 2.0) / 8, rel=0.3)


def test_spacing_mode_trains_on_crops_and_segments_a_larger_scan_whole(tmp_path):
    from expseg_fast.checkpoint import checkpoint_config, load_checkpoint
    from expseg_fast.config import TrainConfig
    from expseg_fast.data import save_volume
    from expseg_fast.data.nifti import load_volume
    from expseg_fast.infer_files import segment
    from expseg_fast.train import train

    rng = np.random.default_rng(8)
    data = tmp_path / "data"
    for i in range(4):
        labels = np.zeros((24, 28, 20), np.uint8)
        labels[6:14, 8:18, 5:12] = 1
        image = labels + rng.normal(scale=0.2, size=labels.shape)
        save_volume(data / "imagesTr" / f"c{i}_0000.nii.gz", image.astype(np.float32), np.diag([1.5, 1.5, 1.5, 1]))
        save_volume(data / "labelsTr" / f"c{i}.nii.gz", labels, np.diag([1.5, 1.5, 1.5, 1]))
    (data / "map.json").write_text('{"classes": [{"name": "bg", "ids": [0]}, {"name": "box", "ids": [1]}]}')
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), data=str(data), label_map=str(data / "map.json"), size=16, width=4, epochs=1,
                      preprocessing="spacing", spacing_mm=1.0, loader_workers=0))
    config = checkpoint_config(load_checkpoint(out / "best.pt"), out / "best.pt")
    assert (config.preprocessing, config.spacing_mm) == ("spacing", 1.0)
    big = np.zeros((40, 36, 30), np.float32)  # 60 x 54 x 45 mm: several 16 mm windows per axis
    save_volume(tmp_path / "scan" / "big.nii.gz", big + rng.normal(size=big.shape).astype(np.float32),
                np.diag([1.5, 1.5, 1.5, 1]))
    written = segment(out / "best.pt", tmp_path / "scan" / "big.nii.gz", tmp_path / "pred")
    assert load_volume(written[0]).data.shape == (40, 36, 30)
