"""The preprocessing plans (expseg_fast/data/plans.py): each mode's geometry, its windows, its record and
its cache key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from expseg_fast.config import TrainConfig
from expseg_fast.data import preprocess
from expseg_fast.data.plans import PLANS, FitPlan, Plan, SpacingPlan, value_moments, window_starts
from expseg_fast.data.preprocess import IGNORE, apply_labels, foreground_centre, plan_spacing, plan_spacing_whole


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


def test_a_plan_is_rebuilt_from_its_checkpoint_record_and_refuses_an_unknown_one():
    for plan in (FitPlan(48), SpacingPlan(64, 2.5)):
        assert Plan.from_record(plan.record()) == plan
    assert FitPlan(48).record() == {"mode": "fit", "size": 48}
    assert SpacingPlan(64, 2.5).record() == {"mode": "spacing", "size": 64, "spacing_mm": 2.5}
    with pytest.raises(ValueError, match="unknown preprocessing mode 'patches'"):
        Plan.from_record({"mode": "patches", "size": 48})
    with pytest.raises(ValueError, match="preprocessing spacing: "):
        Plan.from_record({"mode": "spacing", "size": 48})


def test_the_configuration_names_its_plan_and_the_keys_differ_by_every_setting():
    assert TrainConfig(size=32).plan() == FitPlan(32)
    assert TrainConfig(size=32, preprocessing="spacing", spacing_mm=3.0).plan() == SpacingPlan(32, 3.0)
    assert set(PLANS) == {"fit", "spacing"}
    keys = [FitPlan(32).key(), FitPlan(48).key(), SpacingPlan(32, 3.0).key(), SpacingPlan(32, 2.0).key()]
    assert len({str(sorted(k.items())) for k in keys}) == 4
    assert FitPlan(32).key()["normalisation"] == "fov" and SpacingPlan(32, 3.0).key()["normalisation"] == "nonzero"


def test_windows_cover_the_grid_and_a_cube_is_one_window():
    assert FitPlan(16).windows((16, 16, 16)) == [(0, 0, 0)]
    corners = SpacingPlan(16, 1.0).windows((20, 27, 33))
    covered = np.zeros((20, 27, 33), bool)
    for a, b, c in corners:
        covered[a:a + 16, b:b + 16, c:c + 16] = True
    assert covered.all() and len(corners) == 2 * 3 * 4


def test_each_plan_names_what_it_would_lose_or_what_would_cost_too_much():
    eye = np.eye(4)
    assert "would be lost" in FitPlan(16).scan_problem("thin.nii", (64, 64, 1), eye, 10**9)
    assert FitPlan(16).scan_problem("fine.nii", (64, 64, 32), eye, 10**9) is None
    huge = np.diag([200.0, 200.0, 200.0, 1.0])
    assert "a grid of 1200x1200x1200" in SpacingPlan(16, 2.0).scan_problem("huge.nii", (12, 12, 12), huge, 10**8)
    assert SpacingPlan(16, 2.0).scan_problem("fine.nii", (64, 64, 1), eye, 10**8) is None  # windows keep a slab


def test_the_generators_windows_are_drawn_among_those_inference_slides_over():
    """Centred on the foreground without a generator; with one, every corner of the grid is drawn."""
    import torch

    plan, grid = SpacingPlan(16, 2.0), (20, 27, 16)
    classes = torch.zeros(grid, dtype=torch.uint8)
    classes[2:6, 20:25, 3:9] = 1
    centred = plan.training_window(grid, classes)
    assert [s.start for s in centred] == [0, 11, 0]  # centre (3.5, 22, 5.5) - 7.5, held inside the grid
    gen = torch.Generator().manual_seed(0)
    corners = [tuple(s.start for s in plan.training_window(grid, classes, gen)) for _ in range(400)]
    assert {c[0] for c in corners} == set(range(5)) and {c[1] for c in corners} == set(range(12))
    assert {c[2] for c in corners} == {0} and FitPlan(16).training_window((16,) * 3, classes, gen) == (slice(None),) * 3


@pytest.mark.parametrize("plan", [FitPlan(24), SpacingPlan(16, 2.0)], ids=["fit", "spacing"])
def test_the_numpy_and_torch_normalisations_are_one_rule(plan):
    """The files' path (numpy: apply_image through plan.image) and the generator's (torch: plan.normalise
    on the resampled grid) normalise alike: the fov rule by the voxels inside the scan, the nonzero rule
    by the scan's own non-zero statistics; the two moments functions (numpy and torch) against float64
    NumPy and each other, on a scan with zeros and a grid that reaches beyond it."""
    rng = np.random.default_rng(11)
    image = rng.normal(60.0, 12.0, (19, 23, 14)).astype(np.float32)
    image[:5] = 0.0
    affine = np.diag([1.7, 1.1, 2.3, 1.0])
    r = plan.inference_grid(image.shape, affine)
    resampled = ndimage.map_coordinates(image, preprocess._map(r.target_shape, r.matrix, r.offset), order=1,
                                        mode="nearest")
    inside = preprocess.field_of_view(r)
    assert not inside.all()  # the grid reaches beyond the scan
    stats = plan.statistics(image)
    moments = None if stats is None else (torch.tensor(stats.mean), torch.tensor(stats.std))
    numpy_path = plan.image([image], r)[0]
    torch_path = plan.normalise(torch.from_numpy(resampled), torch.from_numpy(inside), moments).numpy()
    np.testing.assert_allclose(torch_path, numpy_path, atol=2e-5)
    values = image[image != 0].astype(np.float64) if stats is not None else resampled[inside].astype(np.float64)
    for found in (preprocess.array_moments(values), value_moments(torch.from_numpy(values))):  # the twins
        assert float(found[0]) == pytest.approx(values.mean(), rel=1e-12)
        assert float(found[1]) == pytest.approx(values.std(), rel=1e-12)
    for edge, want in ((np.zeros(0), [0.0, 1.0]), (np.full(5, 3.0), [3.0, 1.0])):  # none; no spread: divided by 1
        assert list(preprocess.array_moments(edge)) == want
        assert [float(v) for v in value_moments(torch.from_numpy(edge))] == want


def test_the_training_window_centres_the_foreground_as_the_numpy_plan_leaving_ignored_voxels_out():
    """SpacingPlan's window on a whole-scan grid (torch classes) is centred where foreground_centre says:
    ignored voxels (IGNORE) are not foreground."""
    classes = np.zeros((40, 36, 44), np.uint8)
    classes[6:14, 20:30, 9:15] = 3
    classes[35:, :3, 40:] = IGNORE
    plan = SpacingPlan(16, 2.0)
    window = plan.training_window(classes.shape, torch.from_numpy(classes))
    centre = foreground_centre(classes)
    for s, c in zip(window, centre):
        assert s.stop - s.start == 16 and abs((s.start + s.stop - 1) / 2 - c) <= 0.5
