"""Training data streamed from the preprocessed cache (expseg_fast/data/cache.py).

`prepare` preprocesses the subjects that the cache lacks, in parallel processes, with a progress line
and a summary (subjects, spacing and field-of-view ranges, label voxel counts); an interrupted
preparation resumes from the entries already written. `CachedSubjects` reads one subject at a time
from its memory-mapped arrays, and `subject_loader` delivers a given order of subjects through
background workers (pinned memory on CUDA, for non-blocking copies), so the trainer's memory does not
grow with the number of subjects.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from expseg_fast.data.cache import broken_note, build_entry, entry_path, entry_problem, read_entry, remove_orphans
from expseg_fast.data.dataset import LabelMap, Pair
from expseg_fast.data.facts import training_range
from expseg_fast.data.plans import Plan

PARALLEL_FROM = 4  # fewer subjects to prepare than this: in this process (starting workers costs seconds)


def prepare(pairs: list[Pair], label_map: LabelMap, plan: Plan, cache_dir: Path, workers: int | None = None,
            report: bool = True) -> list[Path]:
    """The cache entries of the pairs (in their order), each checked against its manifest: those missing
    or broken (rebuilt with a note naming each) are preprocessed with `workers` processes (default: the
    CPU count, at most 8) as the plan's training grid says. Temporary folders of killed
    preparations are removed first. ValueError when cache_dir is not a folder; NoSpaceError naming the
    file when the disk fills up (nothing half-written stays)."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ValueError(f"{cache_dir}: exists and is not a folder; the preprocessed cache is kept there: move the "
                         f"file away")
    if cache_dir.is_dir():
        for path in remove_orphans(cache_dir):
            print(f"removed {path} (left by an interrupted preparation)", flush=True)
    entries = [entry_path(p, label_map, plan, cache_dir) for p in pairs]
    pending = []
    for i, entry in enumerate(entries):
        problem = entry_problem(entry, len(label_map.names))
        if problem is not None:
            pending.append(i)
        if problem not in (None, "missing"):
            print(broken_note(entry, pairs[i], problem), file=sys.stderr, flush=True)
    workers = min(workers or min(8, os.cpu_count() or 1), len(pending))
    progress = _Progress(len(pending), report and sys.stderr.isatty())
    if workers > 1 and len(pending) >= PARALLEL_FROM:
        # forked (on Linux), like DataLoader workers: a spawned worker would re-run a caller's unguarded
        # script; the children run only numpy, scipy and nibabel, no torch threads
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(build_entry, pairs[i], label_map, plan, cache_dir) for i in pending]
            try:
                for future in as_completed(futures):
                    future.result()
                    progress.step()
            except BaseException:  # a full disk, say: the rest is not started
                pool.shutdown(cancel_futures=True)
                raise
    else:
        for i in pending:
            build_entry(pairs[i], label_map, plan, cache_dir)
            progress.step()
    progress.done()
    if report:
        print(summary(entries, label_map), flush=True)
    return entries


def facts_range(entries: list[Path]) -> dict:
    """The training range (expseg_fast/data/facts.py) of these subjects' originals."""
    return training_range([read_entry(entry).facts for entry in entries])


def summary(entries: list[Path], label_map: LabelMap) -> str:
    """Subjects, the ranges of voxel size, field of view and intensity of the originals, label voxel counts."""
    counts = np.zeros(len(label_map.names), dtype=np.int64)
    for entry in entries:
        labels = read_entry(entry).labels
        counts += np.bincount(np.asarray(labels).reshape(-1), minlength=len(counts))[: len(counts)]
    seen = facts_range(entries)
    (s0, s1), (f0, f1), (i0, i1) = seen["spacing_mm"], seen["field_of_view_mm"], seen["intensity_p99"]
    labels = ", ".join(f"{name} {count}" for name, count in zip(label_map.names, counts))
    return (f"prepared {len(entries)} subjects: voxel size {s0:.2f}-{s1:.2f} mm, field of view {f0:.0f}-{f1:.0f} mm, "
            f"orientations {', '.join(seen['orientations'])}, intensity 99th percentile {i0:.4g}-{i1:.4g}; "
            f"label voxels at the training size: {labels}")


class _Progress:
    def __init__(self, total: int, show: bool) -> None:
        self.total, self.count, self.show = total, 0, show and total > 0

    def step(self) -> None:
        self.count += 1
        if self.show:
            print(f"\r  preprocessing {self.count}/{self.total}", end="", file=sys.stderr)

    def done(self) -> None:
        if self.show:
            print(file=sys.stderr)


class CachedSubjects(torch.utils.data.Dataset):
    """Subject i of the cache entries: (image (K, S, S, S) float32 for K channels, labels (S, S, S)
    uint8), read from the memory-mapped arrays when asked for (nothing is held between calls)."""

    def __init__(self, entries: list[Path]) -> None:
        self.entries = list(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = read_entry(self.entries[index])
        image = torch.from_numpy(np.array(sample.image))
        return (image[None] if image.dim() == 3 else image), torch.from_numpy(np.array(sample.labels))


class OrderSampler(torch.utils.data.Sampler):
    """Yields the subject indices set for the coming epoch (`order`), so the trainer's seeded order
    decides what the workers load."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.order))

    def __len__(self) -> int:
        return len(self.order)


def subject_loader(subjects: CachedSubjects, sampler: OrderSampler, workers: int,
                   pin: bool) -> torch.utils.data.DataLoader:
    """One subject per item (batch size 1), prefetched by `workers` background processes (0: in this one).
    Its own generator: iterating draws the workers' seeds from it, never from the global torch RNG that
    the model's noise and dropout use (so the loader leaves training results unchanged)."""
    return torch.utils.data.DataLoader(
        subjects, batch_size=None, sampler=sampler, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
    )
