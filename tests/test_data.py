"""NIfTI IO, dataset discovery and scan, and the preprocessing round trip onto the original grid."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from expseg_fast.data import (
    DatasetError,
    LabelMap,
    VolumeError,
    apply_image,
    apply_labels,
    find_pairs,
    invert_labels,
    load_volume,
    plan,
    save_volume,
    scan,
    validate,
)
from expseg_fast.data.dataset import present_values
from expseg_fast.data.plans import FitPlan, SpacingPlan
from expseg_fast.data.preprocess import IGNORE, Resampling


def random_affine(rng, spacing) -> np.ndarray:
    """Non-canonical: permuted and flipped axes, a small rotation, anisotropic spacing, an offset."""
    axes = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
    rotation = Rotation.from_euler("xyz", rng.uniform(-0.25, 0.25, 3)).as_matrix() @ axes
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = rng.uniform(-80, 80, 3)
    return affine


def blob_labels(rng, shape, affine, count=6, radius=(6.0, 14.0)) -> np.ndarray:
    """Balls in world space (so their size does not depend on the voxel grid)."""
    voxels = np.indices(shape).reshape(3, -1).T
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    labels = np.zeros(len(world), np.int16)
    for value, center in enumerate(world[rng.choice(len(world), count)], start=1):
        labels[np.linalg.norm(world - center, axis=1) < rng.uniform(*radius)] = value
    return labels.reshape(shape)


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_returns_labels_to_the_original_grid(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(24, 60, 3))
    spacing = rng.uniform(0.7, 3.0, 3)
    affine = random_affine(rng, spacing)
    labels = blob_labels(rng, shape, affine)
    r = plan(shape, affine, 128)
    back = invert_labels(apply_labels(labels, r), r)
    assert back.shape == labels.shape and back.dtype == labels.dtype
    assert (back == labels).mean() >= 0.99
    # The preprocessed volume's affine puts each target voxel where its source sample is.
    t = np.array([5.0, 70.0, 33.0])
    s = r.matrix @ t + r.offset
    assert np.allclose(r.target_affine @ np.append(t, 1), affine @ np.append(s, 1))


@pytest.mark.parametrize("seed", range(4))
def test_nearest_resampling_equals_an_index_grid_and_fancy_indexing(seed):
    """apply_labels / invert_labels (an index vector per axis, one outer gather) give exactly the plain
    form: every voxel's index vector through the matrix product, then volume[i, j, k]; a rotation is
    refused, not resampled wrong."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(20, 50, 3))
    affine = random_affine(rng, rng.uniform(0.7, 3.0, 3))
    labels = rng.integers(0, 30, shape).astype(np.int16)
    r = plan(shape, affine, 64)

    def plain(volume, out_shape, matrix, offset, fill):
        coords = (matrix @ np.indices(out_shape, dtype=np.float64).reshape(3, -1) + offset[:, None])
        idx = np.rint(coords).astype(np.int64).reshape(3, *out_shape)
        bound = np.array(volume.shape)[:, None, None, None]
        inside = ((idx >= 0) & (idx < bound)).all(axis=0)
        got = volume[tuple(np.clip(idx, 0, bound - 1))]
        return got if fill is None else np.where(inside, got, fill).astype(volume.dtype)

    forward = apply_labels(labels, r)
    assert np.array_equal(forward, plain(labels, r.target_shape, r.matrix, r.offset, 0))
    inverse = np.linalg.inv(r.matrix)
    assert np.array_equal(invert_labels(forward, r), plain(forward, r.source_shape, inverse, -inverse @ r.offset, None))
    rotated = Rotation.from_euler("z", 0.1).as_matrix() @ r.matrix
    with pytest.raises(ValueError, match="permutation"):
        apply_labels(labels, Resampling(r.source_shape, r.source_affine, r.target_shape, rotated, r.offset))


def test_plan_is_isotropic_cubic_and_keeps_the_whole_field_of_view():
    rng = np.random.default_rng(7)
    shape, spacing = (30, 50, 20), np.array([1.0, 0.8, 2.4])
    affine = random_affine(rng, spacing)
    r = plan(shape, affine, 64)
    target_spacing = np.linalg.norm(r.target_affine[:3, :3], axis=0)
    assert np.allclose(target_spacing, target_spacing[0])  # isotropic
    assert np.isclose(target_spacing[0] * 64, max(n * z for n, z in zip(shape, spacing)), rtol=0.02)
    ends = [(0, n - 1) for n in shape]
    corners = np.array([[i, j, k] for i in ends[0] for j in ends[1] for k in ends[2]], float)
    inside = np.linalg.solve(r.matrix, (corners - r.offset).T).T  # corners on the target grid
    assert (inside > -0.5).all() and (inside < 63.5).all()


def test_image_resampling_is_normalised_inside_the_field_of_view_only():
    rng = np.random.default_rng(1)
    shape = (20, 40, 30)
    affine = random_affine(rng, (1.0, 1.0, 2.0))
    image = rng.normal(100.0, 20.0, shape).astype(np.float32)
    out = apply_image(image, plan(shape, affine, 48))
    inside = out != 0
    assert abs(out[inside].mean()) < 1e-3 and abs(out[inside].std() - 1) < 1e-3
    assert (~inside).sum() > 0  # the padding of the shorter sides stays 0


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(2)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    affine = random_affine(rng, (1.0, 1.5, 2.0))
    path = tmp_path / f"x{suffix}"
    save_volume(path, data, affine)
    volume = load_volume(path)
    assert np.array_equal(volume.data, data) and np.allclose(volume.affine, affine, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def write_pair(root, name, image, labels, affine, label_affine=None):
    """A case NAME whose image is `image` plus a constant of its own (two cases never hold one scan)."""
    save_volume(root / "imagesTr" / f"{name}_0000.nii.gz", image + np.float32(zlib.crc32(name.encode()) % 1000), affine)
    save_volume(root / "labelsTr" / f"{name}.nii.gz", labels, affine if label_affine is None else label_affine)


def test_scan_reports_every_problem_once_naming_its_file(tmp_path):
    rng = np.random.default_rng(3)
    affine = random_affine(rng, (1.0, 1.0, 1.0))
    good = np.zeros((8, 8, 8), np.int16)
    good[2:5, 2:5, 2:5] = 1
    image = rng.normal(size=(8, 8, 8)).astype(np.float32)
    write_pair(tmp_path, "ok", image, good, affine)
    nan_image = image.copy()
    nan_image[0, 0, 0] = np.nan
    write_pair(tmp_path, "nan", nan_image, good, affine)
    write_pair(tmp_path, "shape", image, good[:7], affine)
    write_pair(tmp_path, "affine", image, good, affine, affine @ np.diag([1.0, 1.0, 1.5, 1.0]))
    outside = good.copy()
    outside[0, 0, 0] = 9
    write_pair(tmp_path, "outside", image, outside, affine)
    write_pair(tmp_path, "empty", image, np.zeros_like(good), affine)
    write_pair(tmp_path, "flat", image[..., 0], good[..., 0], affine)
    write_pair(tmp_path, "trunc", image, good, affine)
    truncated = tmp_path / "imagesTr" / "trunc_0000.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (tmp_path / "imagesTr" / "junk_0000.nii.gz").write_bytes(gzip.compress(b"not a nifti file" * 20))
    save_volume(tmp_path / "labelsTr" / "junk.nii.gz", good, affine)

    problems = scan(find_pairs(tmp_path), LabelMap.identity(3))
    expected = {
        "nan": "NaN or Inf", "shape": "differs from its image", "affine": "affine differs",
        "outside": "outside the label map: 9", "empty": "empty label map", "flat": "expected a 3-d volume",
        "trunc": "unreadable or truncated", "junk": "unreadable or truncated",
    }
    for name, message in expected.items():
        hits = [p for p in problems if f"/{name}" in p and message in p]
        assert len(hits) == (2 if name == "flat" else 1), (name, problems)
    assert not [p for p in problems if "/ok" in p]
    assert len(problems) == len(expected) + 1  # flat: both files are 2-d
    with pytest.raises(DatasetError, match="9 problem"):
        validate(find_pairs(tmp_path), LabelMap.identity(3))


def test_find_pairs_reports_missing_partners_and_reads_lists(tmp_path):
    rng = np.random.default_rng(4)
    affine = np.eye(4)
    labels = np.ones((4, 4, 4), np.uint8)
    write_pair(tmp_path, "a", rng.normal(size=(4, 4, 4)).astype(np.float32), labels, affine)
    save_volume(tmp_path / "imagesTr" / "b_0000.nii.gz", labels.astype(np.float32), affine)
    with pytest.raises(DatasetError, match="b_0000.nii.gz: no label file"):
        find_pairs(tmp_path)
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"image": "imagesTr/a_0000.nii.gz", "label": "labelsTr/a.nii.gz"}]))
    assert [p.label.name for p in find_pairs(listing)] == ["a.nii.gz"]
    csv_list = tmp_path / "list.csv"
    csv_list.write_text("image,label\nimagesTr/a_0000.nii.gz,labelsTr/a.nii.gz\n")
    assert len(find_pairs(csv_list)) == 1
    with pytest.raises(DatasetError, match="not a dataset folder"):
        find_pairs(tmp_path / "missing")


@pytest.mark.parametrize("dtype, low, high", [
    (np.int8, -128, 127), (np.uint8, 0, 255), (np.int16, -300, 300), (np.uint16, 1000, 1040), (np.int32, -5, 70000),
    (np.int64, 2**40, 2**40 + 9), (np.float32, -3, 40)])
@pytest.mark.parametrize("ignore_unlisted", [False, True])
def test_label_map_apply_unknown_and_present_values_match_a_per_voxel_lookup(dtype, low, high, ignore_unlisted):
    """The lookup table over a narrow range and the sorting fallback (wide ranges, floats) against a dict, voxel
    by voxel, on fresh random ids: negatives, ids the map does not list, the type's own limits."""
    rng = np.random.default_rng()
    labels = rng.integers(low, high, size=(3, 5, 7), endpoint=True).astype(dtype)
    labels.flat[0], labels.flat[1] = low, high
    listed = [int(v) for v in rng.choice(np.unique(labels), size=4, replace=False)]
    label_map = LabelMap(("a", "b", "c"), {v: i % 3 for i, v in enumerate(listed)}, ignore_unlisted)
    values = sorted({int(v) for v in labels.flat})
    assert present_values(labels) == values
    if ignore_unlisted:
        expected = [label_map.lookup.get(int(v), IGNORE) for v in labels.flat]
        assert label_map.apply(labels).ravel().tolist() == expected
        assert label_map.unknown(labels) == []
    else:
        assert label_map.unknown(labels) == [v for v in values if v not in label_map.lookup]
        known = np.isin(labels, listed)
        assert label_map.apply(labels)[known].tolist() == [label_map.lookup[int(v)] for v in labels[known]]
    assert label_map.apply(labels).dtype == np.uint8 and label_map.apply(labels).shape == labels.shape


def test_label_map_apply_on_empty_and_one_valued_arrays():
    label_map = LabelMap(("a", "b"), {-2: 0, 5: 1}, ignore_unlisted=True)
    assert label_map.apply(np.zeros((0, 4), np.int32)).shape == (0, 4)
    assert present_values(np.zeros(0, np.int16)) == []
    assert label_map.apply(np.full((2, 2), 5, np.int16)).tolist() == [[1, 1], [1, 1]]
    assert label_map.apply(np.full(3, -2, np.int8)).tolist() == [0, 0, 0]
    wide = LabelMap.identity(300)  # more classes than uint8 holds: int16 with IGNORE for an unlisted id
    assert label_map.apply(np.array([7])).tolist() == [IGNORE] and wide.apply(np.array([299])).dtype == np.int16


def test_label_map_json(tmp_path):
    path = tmp_path / "map.json"
    classes = [{"name": "background", "ids": [0, 7]}, {"name": "grey", "ids": [100, 101]}]
    path.write_text(json.dumps({"classes": classes}))
    label_map = LabelMap.from_json(path)
    assert label_map.names == ("background", "grey")
    assert label_map.apply(np.array([[[0, 7, 100, 101]]])).tolist() == [[[0, 0, 1, 1]]]
    assert label_map.unknown(np.array([0, 5, 100, 9])) == [5, 9]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="map.json: not a label map"):
        LabelMap.from_json(path)


def test_unreadable_file_error_names_it(tmp_path):
    path = tmp_path / "broken.nii"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(VolumeError, match="broken.nii: unreadable or truncated"):
        load_volume(path)


def test_preprocessed_pairs_are_cached_by_content_and_settings(tmp_path, monkeypatch):
    from expseg_fast.data import cache
    from expseg_fast.data.dataset import Pair

    rng = np.random.default_rng(5)
    affine = random_affine(rng, (1.0, 1.2, 2.0))
    labels = blob_labels(rng, (20, 24, 16), affine, count=3)
    write_pair(tmp_path / "ds", "a", rng.normal(size=labels.shape).astype(np.float32), labels, affine)
    pair = Pair(tmp_path / "ds" / "imagesTr" / "a_0000.nii.gz", tmp_path / "ds" / "labelsTr" / "a.nii.gz")
    label_map = LabelMap.identity(7)
    first = cache.preprocess_pair(pair, label_map, FitPlan(32), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*/image.npy"))) == 1
    calls = []
    real = cache._preprocess
    monkeypatch.setattr(cache, "_preprocess", lambda *a: calls.append(1) or real(*a))
    again = cache.preprocess_pair(pair, label_map, FitPlan(32), tmp_path / "cache")
    assert not calls and np.array_equal(again.image, first.image) and np.array_equal(again.labels, first.labels)
    assert np.allclose(again.resampling.target_affine, first.resampling.target_affine)
    cache.preprocess_pair(pair, label_map, FitPlan(24), tmp_path / "cache")  # other settings: rebuilt
    assert len(calls) == 1
    cache.preprocess_pair(pair, label_map, SpacingPlan(32, 1.0), tmp_path / "cache")  # another plan (and rule)
    assert len(calls) == 2
    save_volume(pair.label, np.zeros_like(labels), affine)  # other content: rebuilt
    cache.preprocess_pair(pair, label_map, FitPlan(32), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*/image.npy"))) == 4
    mapped = cache.preprocess_pair(pair, label_map, FitPlan(32), tmp_path / "cache", mmap=True)  # read in place
    loaded = cache.preprocess_pair(pair, label_map, FitPlan(32), tmp_path / "cache")
    assert isinstance(mapped.image, np.memmap) and np.array_equal(mapped.labels, loaded.labels)
    back = invert_labels(first.labels, first.resampling)
    assert (back == labels).mean() > 0.97


def test_written_prediction_overlays_the_input(tmp_path):
    from expseg_fast.data import preprocess_pair, write_prediction
    from expseg_fast.data.dataset import Pair

    rng = np.random.default_rng(6)
    affine = random_affine(rng, (0.9, 1.3, 2.2))
    labels = blob_labels(rng, (30, 22, 26), affine, count=4)
    write_pair(tmp_path, "p", rng.normal(size=labels.shape).astype(np.float32), labels, affine)
    pair = Pair(tmp_path / "imagesTr" / "p_0000.nii.gz", tmp_path / "labelsTr" / "p.nii.gz")
    sample = preprocess_pair(pair, LabelMap.identity(5), FitPlan(128))
    out = tmp_path / "prediction.nii.gz"
    write_prediction(out, sample.labels, sample.resampling)  # a perfect prediction
    written, original = load_volume(out, dtype=np.int16), load_volume(pair.image)
    assert written.data.shape == original.data.shape
    assert np.allclose(written.affine, original.affine, atol=1e-5)
    assert (written.data == labels).mean() >= 0.99
