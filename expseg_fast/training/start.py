"""Everything a run needs before its first step, in one `Run`: the checked configuration, the device and
processes, the scanned data with its pinned split, the preprocessed cache and its loader, the loss's
label weights, the model, optimizer and random generators, restored from the last checkpoint when the
run resumes. Option errors (a resumed run's differences included) come before the data is read; the
data's problems before anything of the run is written."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expseg_fast.atomic import NoSpaceError, write_atomic
from expseg_fast.checkpoint import checkpoint_pin, load_checkpoint
from expseg_fast.config import DTYPES, TrainConfig
from expseg_fast.data import AugmentConfig, random_splits
from expseg_fast.data.identity import DataPin, label_map_digest
from expseg_fast.data.loader import CachedSubjects, OrderSampler, facts_range, prepare, subject_loader
from expseg_fast.data.plans import Plan
from expseg_fast.data.source import Dataset, open_dataset
from expseg_fast.losses import LossSpec, label_counts, label_weights
from expseg_fast.machine import torch_device
from expseg_fast.models import build_model
from expseg_fast.runlog import read_log
from expseg_fast.training import checkpointing, distributed
from expseg_fast.training.run_folder import RunError, RunFolder

@dataclass
class Run:
    """A run between its epochs. rank/world: this process among those of torchrun (main writes);
    train_idx/val_idx: the pinned split's subjects (indices of data.pairs and of subjects);
    data_range: what segment.py warns outside of; best, best_epoch: the best validation Dice so far."""

    config: TrainConfig
    plan: Plan
    out: Path
    device: torch.device
    rank: int
    world: int
    data: Dataset
    train_idx: list[int]
    val_idx: list[int]
    pin: DataPin
    subjects: CachedSubjects
    sampler: OrderSampler
    loader: torch.utils.data.DataLoader
    weights: torch.Tensor
    spec: LossSpec
    augment: AugmentConfig
    data_range: dict
    model: torch.nn.Module
    net: torch.nn.Module  # the model, wrapped for DDP under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    aug_gen: torch.Generator
    order_gen: torch.Generator
    start_epoch: int = 0
    best: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.config.precision]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if self.config.channels_last else torch.contiguous_format

    @property
    def num_labels(self) -> int:
        return len(self.data.label_map.names)

    def on_device(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A subject (image (K, ...), labels) as a batch of one on the device."""
        return image[None].to(self.device, non_blocking=True), labels[None].to(self.device, non_blocking=True)


def start(config: TrainConfig, resume: bool, folder: RunFolder) -> Run:
    """The run of config in folder (new, or resumed from its last.pt); ValueError / RunError naming
    what keeps it from starting."""
    config.check()
    config = config.with_absolute_paths()  # never re-read against another current folder
    out = Path(config.out)
    device = torch_device(config.device)
    rank, world = distributed.setup(device.type)
    device = distributed.device_for(device)
    problem = config.device_problem(device.type)
    if problem:  # before anything is written
        raise ValueError(problem)
    state = load_checkpoint(out / "last.pt") if resume and (out / "last.pt").exists() else None
    if state is not None:  # option errors before the data is read or preprocessed
        checkpointing.check_resume(config, state, out / "last.pt", rank == 0)
    torch.use_deterministic_algorithms(config.deterministic)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not config.deterministic  # fixed shapes
    if rank != 0:
        distributed.barrier()  # the first process builds the demo data and the cache
    plan = config.plan()
    data = open_dataset(config.data, config.label_map, config.demo_settings(), config.demo_preset, out.parent,
                        config.limit_subjects, plan, config.max_voxels)  # scanned before anything is written
    if rank == 0:
        folder.open(resume)  # locked; a new run never replaces one, resume needs a checkpoint
    config = dataclasses.replace(config, in_channels=len(data.pairs[0].images))  # a property of the data
    train_idx, val_idx, pin = pinned_split(config, data, state, out, rank == 0)
    entries = _cache(data, plan, out.parent / "cache", rank == 0)
    if rank == 0:
        distributed.barrier()
    run = _assemble(config, plan, out, device, rank, world, data, train_idx, val_idx, pin, entries)
    if state is not None:
        checkpointing.restore(run, state)
    elif run.main:
        (out / "log.jsonl").write_text("")
    run.history = read_log(out / "log.jsonl") if run.main else []
    return run


def _cache(data: Dataset, plan: Plan, cache_dir: Path, main: bool) -> list[Path]:
    """The cache entries of the data's subjects (preprocessing those missing): the run's source, read
    one subject per step, memory-mapped, by background workers; labels stay uint8 to the loss."""
    try:
        return prepare(data.pairs, data.label_map, plan, cache_dir, report=main)
    except NoSpaceError as error:
        raise RunError(f"{error}; nothing half-written was kept: free some space and run again") from error


def _assemble(config: TrainConfig, plan: Plan, out: Path, device: torch.device, rank: int, world: int,
              data: Dataset, train_idx: list[int], val_idx: list[int], pin: DataPin, entries: list[Path]) -> Run:
    """The run's loader, label weights, model, optimizer and generators (seeded: a new run's start)."""
    subjects, sampler = CachedSubjects(entries), OrderSampler()
    loader = subject_loader(subjects, sampler, config.loader_workers, pin=device.type == "cuda")
    num_labels = len(data.label_map.names)
    counts = sum(label_counts([subjects[i][1]], num_labels) for i in train_idx)  # one subject in memory at a time
    weights = label_weights(counts.clamp_min(1)).to(device)  # labels absent from the split get the largest weight
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_labels, config.width, config.fuse_levels, config.in_channels).to(device)
    model = model.to(memory_format=torch.channels_last_3d if config.channels_last else torch.contiguous_format)
    return Run(
        config=config, plan=plan, out=out, device=device, rank=rank, world=world, data=data, train_idx=train_idx,
        val_idx=val_idx, pin=pin, subjects=subjects, sampler=sampler, loader=loader, weights=weights,
        spec=config.loss_spec(), augment=config.augment_config(),
        data_range=facts_range([entries[i] for i in train_idx]), model=model,
        net=torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model,
        optimizer=torch.optim.NAdam(model.parameters(), lr=config.lr),
        scaler=torch.amp.GradScaler(device.type, enabled=config.precision == "fp16"),
        aug_gen=torch.Generator().manual_seed(config.seed + 1 + rank),
        order_gen=torch.Generator().manual_seed(config.seed + 2),
    )


def pinned_split(config: TrainConfig, data: Dataset, state: dict | None, out: Path,
                 main: bool) -> tuple[list[int], list[int], DataPin]:
    """(training indices, validation indices, the pin) of a run: a new run draws its split (one of
    `splits` random 70/30 splits) and pins it with the data's identity in OUT/splits.json; a resumed one
    takes the pinned subjects from the data as it is now (ValueError naming what changed), never one
    added since. A checkpoint older than pinning has its split recomputed, with a warning."""
    pin = checkpoint_pin(state, out / "last.pt") if state is not None else None
    if pin is not None:
        train_idx, val_idx, unused = pin.select(data.subjects, data.label_map, str(data.root))
        if unused and main:
            print(f"note: {unused} subject(s) of {data.root} are not in the run's pinned split ({out / 'splits.json'}) "
                  f"and are not used by this resumed run", flush=True)
        return train_idx, val_idx, pin
    if state is not None and main:
        print(f"warning: {out / 'last.pt'} predates pinned splits: its split is recomputed from the subject count "
              f"(the same only if the dataset is unchanged)", file=sys.stderr, flush=True)
    train_idx, val_idx = random_splits(len(data.pairs), config.splits, seed=config.seed)[config.split]
    pin = DataPin(str(data.root), str(data.label_map_file) if data.label_map_file else None,
                  label_map_digest(data.label_map), tuple(data.subjects[i] for i in train_idx),
                  tuple(data.subjects[i] for i in val_idx), config.split, config.seed)
    if main and (state is None or not (out / "splits.json").exists()):
        text = pin.to_json()
        write_atomic(out / "splits.json", lambda tmp: Path(tmp).write_text(text), ".json")
    return train_idx, val_idx, pin
