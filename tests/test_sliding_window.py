"""Sliding-window inference: against the answer a perfect per-voxel model gives, on grids that the windows
do not tile evenly, against an independent float64 blending of windows that disagree, and end to end
(a spacing-mode run segmenting a scan larger than its cube)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expseg_fast.data.plans import window_starts
from expseg_fast.inference.sliding_window import gaussian_weights, sliding_window_labels


def test_gaussian_weights_peak_in_the_centre_and_never_vanish():
    w = gaussian_weights(16)
    assert w.shape == (16, 16, 16) and float(w.max()) == pytest.approx(1.0, rel=0.05)
    assert float(w.min()) > 0 and w[8, 8, 8] > w[0, 8, 8] > w[0, 0, 0]


def corners(grid, window=16):
    return [(a, b, c) for a in window_starts(grid[0], window) for b in window_starts(grid[1], window)
            for c in window_starts(grid[2], window)]


@pytest.mark.parametrize("grid", [(16, 16, 16), (20, 27, 33), (41, 17, 16)])
@pytest.mark.parametrize("batch", [1, 3])
def test_sliding_window_labels_match_a_per_voxel_model(grid, batch):
    truth = torch.randint(0, 3, grid)
    image = torch.stack([(truth == c).float() for c in range(3)])  # (K=3, ...): the answer, one-hot

    def probabilities(windows):  # a perfect model that only sees its window
        assert windows.shape == (batch, 3, 16, 16, 16)
        return torch.softmax(20 * windows, dim=1)

    found = sliding_window_labels(probabilities, image, 16, batch, 3, corners(grid))
    assert torch.equal(found, truth)


def blended_reference(votes: list[np.ndarray], starts: list[tuple[int, int, int]], grid, window: int,
                      gaussian: bool) -> np.ndarray:
    """Arg max over classes of sum_w g(x - corner_w) p_w / sum_w g, in float64 with explicit loops; g is a
    Gaussian of sigma window/8 around the window's centre, scaled to 1 at its peak and held >= 1e-4 (or 1)."""
    centre, sigma = (window - 1) / 2, window / 8
    axis = np.exp(-0.5 * ((np.arange(window) - centre) / sigma) ** 2)
    g = axis[:, None, None] * axis[None, :, None] * axis[None, None, :]
    g = np.maximum(g / g.max(), 1e-4) if gaussian else np.ones_like(g)
    total = np.zeros((votes[0].shape[0], *grid))
    norm = np.zeros(grid)
    for p, (a, b, c) in zip(votes, starts):
        total[:, a:a + window, b:b + window, c:c + window] += p[:, None, None, None] * g
        norm[a:a + window, b:b + window, c:c + window] += g
    return (total / norm).argmax(0)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_overlapping_windows_that_disagree_are_blended_by_their_gaussian_weights(batch):
    """Each window votes one random class distribution for all its voxels: the label of a voxel covered by
    several windows is decided by how close it lies to each window's centre. Uniform weights give other
    labels, so the test tells the Gaussian blending from any other."""
    grid, rng = (20, 27, 33), np.random.default_rng(11)
    starts = corners(grid)
    votes = [rng.dirichlet(np.ones(4)) for _ in starts]
    seen = iter(range(len(starts)))

    def probabilities(windows):  # the window's vote, whatever it sees; padding windows vote nothing useful
        out = torch.zeros((batch, 4, 16, 16, 16))
        for i in range(batch):
            index = next(seen, None)
            if index is not None:
                out[i] = torch.tensor(votes[index], dtype=torch.float32)[:, None, None, None]
        return out

    found = sliding_window_labels(probabilities, torch.zeros((1, *grid)), 16, batch, 4, starts).numpy()
    expected = blended_reference(votes, starts, grid, 16, gaussian=True)
    assert (found == expected).mean() > 0.999  # float32 against float64: ties may round either way
    assert (blended_reference(votes, starts, grid, 16, gaussian=False) != expected).mean() > 0.05


def test_spacing_mode_trains_on_crops_and_segments_a_larger_scan_whole(tmp_path):
    from expseg_fast.checkpoint import checkpoint_config, load_checkpoint
    from expseg_fast.config import TrainConfig
    from expseg_fast.data import save_volume
    from expseg_fast.data.nifti import load_volume
    from expseg_fast.inference.files import segment
    from expseg_fast.training import train

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
