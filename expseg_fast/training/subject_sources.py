"""Where a run's subjects come from, one interface for the trainer: `epoch(order)` yields the training
subjects of one epoch (image (1, K, ...), labels (1, ...) on the device) and `sample(index)` one subject
for validation and the reports.

- CacheSource: a dataset's preprocessed cache (expseg_fast/data/cache.py), read memory-mapped by
  background workers (pinned memory and non-blocking copies on CUDA), labels uint8 to the loss.
- SynthSource: images drawn from label maps on the device by the generator (expseg_fast/data/synth.py),
  a fresh one per step from the run's generator (checkpointed: resume is exact); validation examples
  are drawn once, from the seed, so every epoch validates on the same images.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from expseg_fast.data.anatomy import GenerationTable
from expseg_fast.data.dataset import LabelMap
from expseg_fast.data.facts import VolumeFacts, training_range
from expseg_fast.data.loader import CachedSubjects, OrderSampler, facts_range, subject_loader
from expseg_fast.data.plans import Plan
from expseg_fast.data.preprocess import apply_labels
from expseg_fast.data.synth import ImageGenerator, LabelMapSource, SynthSettings
from expseg_fast.losses import label_counts

Batch = tuple[torch.Tensor, torch.Tensor]


class CacheSource:
    """Subjects of the cache entries (in the dataset's order)."""

    repeats = 1  # passes over the training subjects per epoch

    def __init__(self, entries: list[Path], device: torch.device, workers: int) -> None:
        self.entries, self.device = entries, device
        self.subjects, self.sampler = CachedSubjects(entries), OrderSampler()
        self.loader = subject_loader(self.subjects, self.sampler, workers, pin=device.type == "cuda")

    def _on_device(self, image: torch.Tensor, labels: torch.Tensor) -> Batch:
        return image[None].to(self.device, non_blocking=True), labels[None].to(self.device, non_blocking=True)

    def epoch(self, order: list[int]) -> Iterator[Batch]:
        self.sampler.order = order
        for image, labels in self.loader:
            yield self._on_device(image, labels)

    def sample(self, index: int) -> Batch:
        return self._on_device(*self.subjects[index])

    def label_counts(self, indices: list[int], num_labels: int) -> torch.Tensor:
        """Voxels per class over these subjects' training cubes (one subject in memory at a time)."""
        return sum(label_counts([self.subjects[i][1]], num_labels) for i in indices)

    def data_range(self, indices: list[int]) -> dict:
        return facts_range([self.entries[i] for i in indices])

    def state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass


class SynthSource:
    """Images drawn from label maps; `val_indices`' examples drawn once from `seed`."""

    def __init__(self, maps: list[Path], label_map: LabelMap, plan: Plan, settings: SynthSettings,
                 device: torch.device, seed: int, val_indices: list[int], repeats: int) -> None:
        table = GenerationTable.read()
        self.maps = [LabelMapSource(path, plan, device, settings.field_of_view_mm) for path in maps]
        self.classes = [m.classes(table, label_map) for m in self.maps]
        self.plan, self.device, self.repeats, self.num_classes = plan, device, repeats, len(label_map.names)
        self.generator = ImageGenerator(table, label_map, plan, settings, device)
        self.gen = torch.Generator(device=device).manual_seed(seed + 3)
        fixed = torch.Generator(device=device).manual_seed(seed + 4)
        self.validation = {i: self.generator(self.maps[i], fixed) for i in val_indices}

    def _drawn(self, index: int) -> Batch:
        image, labels = self.generator(self.maps[index], self.gen)
        if not bool(torch.isfinite(image).all()):
            raise ValueError(f"{self.maps[index].path}: the generator drew a non-finite image from it")
        return image[None], labels[None]

    def epoch(self, order: list[int]) -> Iterator[Batch]:
        for index in order:
            yield self._drawn(index)

    def sample(self, index: int) -> Batch:
        image, labels = self.validation[index]
        return image[None], labels[None]

    def label_counts(self, indices: list[int], num_labels: int) -> torch.Tensor:
        """Voxels per class over these label maps' training windows on the plan's grid (undeformed)."""
        counts = torch.zeros(num_labels, dtype=torch.int64)
        for i in indices:
            grid = self.maps[i].grid
            labels = torch.from_numpy(apply_labels(self.classes[i], grid).astype(np.int64))
            window = self.plan.training_window(tuple(labels.shape), labels)
            counts += label_counts([labels[window]], num_labels)
        return counts

    def data_range(self, indices: list[int]) -> dict:
        """The range of the imitated scans' geometry (1 mm; fields of view from the head's extent to the
        imitated scan's) and the label maps' composition; no intensities: the generator draws any."""
        facts = [VolumeFacts.of(np.broadcast_to(np.float32(0), shape), affine, self.classes[i], self.num_classes)
                 for i in indices for shape, affine in ((self.maps[i].shape, self.maps[i].affine),
                                                        (self.maps[i].scan_shape, self.maps[i].scan_affine))]
        return {k: v for k, v in training_range(facts).items() if not k.startswith("intensity")}

    def state(self) -> dict:
        return {"synth_rng": self.gen.get_state()}

    def set_state(self, state: dict) -> None:
        self.gen.set_state(state["synth_rng"])
