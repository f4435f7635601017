"""What users of SynthSeg and FastSurfer expect from segment.py (issue 35): --volumes, a CSV of each scan's
class volumes on its own grid, and --qc, a PNG per scan with three orthogonal slices, the labels over
them and a legend; both written atomically, refused in one line where they cannot be written."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from expseg_fast.data import load_volume, save_volume
from expseg_fast.inference.files import segment
from expseg_fast.inference.qc import _canonical, _slices
from tests.helpers import one_epoch_run

SCRIPTS = Path(__file__).parents[1] / "scripts"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished one-epoch run (its folder) on 6 generated cases (background, box, ball at 2 mm), in data/."""
    return one_epoch_run(tmp_path_factory.mktemp("reports"), 6, seed=5)


def scans(run: Path, folder: Path) -> list[Path]:
    """Two of the run's images under other grids: one as written, one with anisotropic voxels and an
    oblique-free flipped affine (its volumes must use its own voxel size), as .nii.gz and .mgz."""
    folder.mkdir()
    a = load_volume(run.parent / "data" / "imagesTr" / "c0_0000.nii.gz")
    b = load_volume(run.parent / "data" / "imagesTr" / "c1_0000.nii.gz")
    affine = np.diag([-1.5, 2.5, 3.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.0]
    save_volume(folder / "a.nii.gz", a.data, a.affine)
    save_volume(folder / "b.mgz", b.data, affine)
    return [folder / "a.nii.gz", folder / "b.mgz"]


def test_the_volumes_are_each_scans_label_counts_times_its_voxel(run, tmp_path):
    inputs = scans(run, tmp_path / "in")
    written = segment(run / "last.pt", tmp_path / "in", tmp_path / "out", device="cpu", volumes=tmp_path / "v.csv")
    with (tmp_path / "v.csv").open() as f:
        rows = list(csv.reader(f))
    names = ["background", "box", "ball"]
    assert rows[0] == ["file", *names[1:], "total"]
    assert [r[0] for r in rows[1:]] == [p.name for p in inputs]
    for row, labels_file in zip(rows[1:], written):
        image = nib.load(labels_file)
        labels = np.asarray(image.dataobj)
        voxel_mm3 = abs(np.linalg.det(image.affine[:3, :3]))
        expected = [float((labels == c).sum()) * voxel_mm3 for c in (1, 2)]
        assert [float(v) for v in row[1:]] == pytest.approx([*expected, sum(expected)], abs=1e-3)
        assert sum(expected) > 0  # the tiny model finds something: the check is not 0 == 0
    assert abs(np.linalg.det(nib.load(written[1]).affine[:3, :3])) == pytest.approx(1.5 * 2.5 * 3.0)
    with pytest.raises(ValueError, match=r"v\.csv: exists; not replaced \(use --overwrite"):
        segment(run / "last.pt", tmp_path / "in", tmp_path / "out2", device="cpu", volumes=tmp_path / "v.csv")
    before = (tmp_path / "v.csv").read_text()
    assert not (tmp_path / "out2").exists() and (tmp_path / "v.csv").read_text() == before


def test_the_qc_picture_shows_three_slices_with_the_labels_and_a_legend(run, tmp_path):
    scans(run, tmp_path / "in")
    segment(run / "last.pt", tmp_path / "in", tmp_path / "out", device="cpu", qc=tmp_path / "qc")
    pictures = sorted(p.name for p in (tmp_path / "qc").iterdir())
    assert pictures == ["a.png", "b.png"]
    pixels = matplotlib.image.imread(tmp_path / "qc" / "a.png")
    assert pixels.ndim == 3 and pixels.shape[1] > 2.5 * pixels.shape[0]  # three views and a legend side by side
    rgb = pixels[..., :3]
    coloured = (rgb.max(-1) - rgb.min(-1)) > 0.15  # the label colours over a grey image
    assert coloured.mean() > 0.001
    grey = (rgb.max(-1) - rgb.min(-1)) < 0.02
    assert grey.mean() > 0.3


def test_the_qc_views_are_the_scans_anatomical_axes():
    """An LIA volume with a marker at its right, anterior, superior corner: after the reorientation the
    marker is at the top of every view (superior; anterior in the axial one), on the right of the axial
    and coronal views (the patient's right, neurological) and of the sagittal one (anterior)."""
    volume = np.zeros((20, 22, 24), np.float32)
    affine = np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])  # LIA: x, z, y flipped
    volume[0:3, 0:3, 21:24] = 1.0  # i low = right (x = -i), j low = superior (y... z = -j), k high = anterior
    data, edges = _canonical(volume, affine)
    assert data.shape == (20, 24, 22) and list(edges) == [1.0, 1.0, 1.0]
    centre = tuple(int(np.mean(a)) for a in np.nonzero(data))
    for view in _slices(data, centre):
        rows, cols = np.nonzero(view)
        assert rows.max() < view.shape[0] / 2 and cols.min() > view.shape[1] / 2


def test_the_script_names_a_bad_volumes_file_or_qc_folder_in_one_line(run, tmp_path):
    inputs = scans(run, tmp_path / "in")
    (tmp_path / "file").write_text("x")
    for option, value, message in (("--volumes", str(tmp_path), "is a folder; --volumes takes a CSV file name"),
                                   ("--qc", str(tmp_path / "file"), "exists and is not a folder")):
        done = subprocess.run([sys.executable, str(SCRIPTS / "segment.py"), str(run / "last.pt"), str(inputs[0]),
                               str(tmp_path / "out"), "--device", "cpu", option, value], capture_output=True, text=True)
        assert done.returncode != 0 and "Traceback" not in done.stderr
        assert done.stderr.strip().count("\n") == 0 and message in done.stderr


def test_flip_averaging_segments_each_scan_through_the_script(run, tmp_path):
    """--flip (expseg_fast/inference/mirroring.py) through segment.py: every scan written, in the plain
    segmentation's format and grid, and mostly the same labels (a one-epoch model is not symmetric)."""
    inputs = scans(run, tmp_path / "in")
    plain = segment(run / "last.pt", tmp_path / "in", tmp_path / "plain", device="cpu")
    done = subprocess.run([sys.executable, str(SCRIPTS / "segment.py"), str(run / "last.pt"), str(tmp_path / "in"),
                           str(tmp_path / "flip"), "--device", "cpu", "--flip"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for path, input_path in zip(plain, inputs):
        a, b = nib.load(path), nib.load(tmp_path / "flip" / input_path.name)
        assert a.shape == b.shape and np.allclose(a.affine, b.affine)
        assert (np.asarray(a.dataobj) == np.asarray(b.dataobj)).mean() > 0.8
