"""Where a run works: its output folder, its device and this process's place among torchrun's processes
(the main one, rank 0, writes; the others train their shards and wait for it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Place:
    out: Path  # the run's folder: checkpoints, log, reports
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes (rank 0)."""
        return self.rank == 0

    @property
    def cache(self) -> Path:
        """The preprocessed subjects' cache, shared by the runs beside this one."""
        return self.out.parent / "cache"
