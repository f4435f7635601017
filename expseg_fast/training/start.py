"""Everything a run needs before its first step, in one `Run`: the checked configuration, the device and
processes, the scanned data (a dataset, or the packaged label maps for the generator, and the data it
validates on) with its pinned split, the sources of its subjects (training/subject_sources.py), the loss's
label weights, the model, optimizer and random generators, restored from the last checkpoint when the
run resumes. Option errors (a resumed run's differences included) come before the data is read; the
data's problems before anything of the run is written."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expseg_fast.atomic import NoSpaceError, write_atomic
from expseg_fast.checkpoint import checkpoint_pin, load_checkpoint
from expseg_fast.config import DTYPES, TrainConfig
from expseg_fast.data import AugmentConfig
from expseg_fast.data.identity import DataPin, PinnedSubjects, label_map_digest
from expseg_fast.data.loader import prepare
from expseg_fast.data.plans import Plan
from expseg_fast.data.source import SYNTH, Dataset, open_synth
from expseg_fast.losses import LossSpec, label_weights
from expseg_fast.machine import torch_device
from expseg_fast.runlog import read_log
from expseg_fast.training import distributed, run_state, selection
from expseg_fast.training.run_folder import RunError, RunFolder
from expseg_fast.training.selection import RealCheck
from expseg_fast.training.step import TrainStep
from expseg_fast.training.subject_sources import CacheSource, SynthSource


@dataclass
class Run:
    """A run between its epochs. rank/world: this process among those of torchrun (main writes);
    data/val_data: the training and validation data (one dataset for a split of it; val_data.lacking: the
    classes its labels do not have, not scored); train_idx/val_idx: the pinned subjects (indices of
    train_source and val_source); data_range: what segment.py warns outside of; best, best_epoch: the best
    figure of best_by so far."""

    config: TrainConfig
    plan: Plan
    out: Path
    device: torch.device
    rank: int
    world: int
    data: Dataset
    val_data: Dataset
    train_idx: list[int]
    val_idx: list[int]
    pin: DataPin
    train_source: CacheSource | SynthSource
    val_source: CacheSource | SynthSource
    weights: torch.Tensor
    spec: LossSpec
    augment: AugmentConfig
    data_range: dict
    model: torch.nn.Module
    net: torch.nn.Module  # the model, wrapped for DDP under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: TrainStep
    aug_gen: torch.Generator
    order_gen: torch.Generator
    start_epoch: int = 0
    best: float = -1.0
    best_epoch: int = -1
    best_by: str = selection.VALIDATION  # the figure that chooses best.pt
    real_check: RealCheck | None = None  # a real scan scored besides the validation (Colin27)
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


def start(config: TrainConfig, resume: bool, folder: RunFolder) -> Run:
    """The run of config in folder (new, or resumed from its last.pt); ValueError / RunError naming
    what keeps it from starting."""
    config.check()
    config = config.with_absolute_paths()  # never re-read against another current folder
    out = Path(config.out)
    device = torch_device(config.device)
    rank, world = distributed.setup(device.type)
    device = distributed.device_for(device)
    problem = config.device_problem(device.type, world)
    if problem:  # before anything is written
        raise ValueError(problem)
    state = load_checkpoint(out / "last.pt") if resume and (out / "last.pt").exists() else None
    if state is not None:  # option errors before the data is read or preprocessed
        run_state.check_resume(config, state, out / "last.pt", rank == 0)
    torch.use_deterministic_algorithms(config.deterministic)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not config.deterministic  # fixed shapes
    if rank != 0:
        distributed.barrier()  # the first process builds the demo data and the cache
    plan = config.plan()
    data, val_data = _datasets(config, out, plan)  # scanned before anything is written
    if rank == 0:
        folder.open(resume)  # locked; a new run never replaces one, resume needs a checkpoint
    config = dataclasses.replace(config, in_channels=data.channels)  # a property of the data
    train_idx, val_idx, pin = pinned_split(config, data, val_data, state, out, rank == 0)
    chosen_by = selection.best_by(config, state)
    with _cache_space():
        train_source, val_source = _sources(config, plan, data, val_data, val_idx, device, out.parent / "cache",
                                            rank == 0)
        check = (selection.colin27_check(config, plan, data, device, out.parent / "cache", rank == 0)
                 if chosen_by == selection.COLIN27 else None)
    if rank == 0:
        distributed.barrier()
    run = _assemble(config, plan, out, device, rank, world, (data, val_data), (train_idx, val_idx), pin,
                    (train_source, val_source))
    run.best_by, run.real_check = chosen_by, check
    if state is not None:
        run_state.restore(run, state)
    elif run.main:
        (out / "log.jsonl").write_text("")
    run.history = read_log(out / "log.jsonl") if run.main else []
    return run


def _datasets(config: TrainConfig, out: Path, plan: Plan) -> tuple[Dataset, Dataset]:
    """(the training data, the validation data: the same dataset for a split of it), each scanned; the
    validation data's label map aligned to the training classes."""
    if config.data == SYNTH:
        data = open_synth(config.limit_subjects)
    else:
        data = config.open_data(config.data, config.label_map, out, config.limit_subjects, plan, config.max_voxels)
    if config.val_data is None:
        return data, data
    val = config.open_data(config.val_data, config.val_label_map, out, None, plan, config.max_voxels)
    val.label_map, val.lacking = val.label_map.aligned_to(data.label_map.names, config.val_label_map)
    if val.channels != data.channels:
        raise ValueError(f"{config.val_data}: {val.channels} channel(s) per case, the training data has "
                         f"{data.channels}")
    return data, val


def _sources(config: TrainConfig, plan: Plan, data: Dataset, val_data: Dataset, val_idx: list[int],
             device: torch.device, cache_dir: Path, main: bool):
    """(the training source, the validation source): the generator for synth, else the data's cache
    (prepared now: subjects missing from it are preprocessed)."""
    if data.maps:
        train = SynthSource(data.maps, data.label_map, plan, config.synth_settings(), device, config.seed,
                            val_idx if val_data is data else [], config.synth_repeats)
    else:
        train = CacheSource(prepare(data.pairs, data.label_map, plan, cache_dir, report=main), device,
                            config.loader_workers)
    if val_data is data:
        return train, train
    return train, CacheSource(prepare(val_data.pairs, val_data.label_map, plan, cache_dir, report=main), device, 0)


@contextmanager
def _cache_space() -> Iterator[None]:
    """A full disk while the cache is prepared (the run's subjects, Colin27's check) becomes the RunError
    that says nothing half-written was kept."""
    try:
        yield
    except NoSpaceError as error:
        raise RunError(f"{error}; nothing half-written was kept: free some space and run again") from error


def _assemble(config: TrainConfig, plan: Plan, out: Path, device: torch.device, rank: int, world: int,
              datasets: tuple[Dataset, Dataset], split: tuple[list[int], list[int]], pin: DataPin,
              sources: tuple) -> Run:
    """The run's label weights, model, optimizer and generators (seeded: a new run's start)."""
    (data, val_data), (train_idx, val_idx), (train_source, val_source) = datasets, split, sources
    num_labels = len(data.label_map.names)
    counts = train_source.label_counts(train_idx, num_labels)
    weights = label_weights(counts.clamp_min(1)).to(device)  # labels absent from the split get the largest weight
    torch.manual_seed(config.seed)
    model = config.network(num_labels).to(device)
    memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    graphed = config.step_mode == "cuda_graph"  # the graph reads the scheduled learning rate from the device
    lr = torch.tensor(config.lr, device=device) if graphed else config.lr
    optimizer = torch.optim.NAdam(model.parameters(), lr=lr, capturable=graphed)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    step = TrainStep(model, net, optimizer, scaler, weights, config.loss_spec(), DTYPES[config.precision],
                     memory_format, config.step_mode)
    return Run(
        config=config, plan=plan, out=out, device=device, rank=rank, world=world, data=data, val_data=val_data,
        train_idx=train_idx, val_idx=val_idx, pin=pin, train_source=train_source,
        val_source=val_source,
        weights=weights, spec=config.loss_spec(), augment=config.augment_config(),
        data_range=train_source.data_range(train_idx), model=model, net=net, optimizer=optimizer, scaler=scaler,
        step=step, aug_gen=torch.Generator().manual_seed(config.seed + 1 + rank),
        order_gen=torch.Generator().manual_seed(config.seed + 2),
    )


def _pinned(data: Dataset, indices: list[int]) -> PinnedSubjects:
    return PinnedSubjects(str(data.root), str(data.label_map_file) if data.label_map_file else None,
                          label_map_digest(data.label_map), tuple(data.subjects[i] for i in indices))


def pinned_split(config: TrainConfig, data: Dataset, val_data: Dataset, state: dict | None, out: Path,
                 main: bool) -> tuple[list[int], list[int], DataPin]:
    """(training indices, validation indices, the pin) of a run: a new run draws its split (one of
    `splits` random 70/30 splits of the data, or all of it with separate validation data) and pins it
    with the data's identity in OUT/splits.json; a resumed one takes the pinned subjects from the data as
    it is now (ValueError naming what changed), never one added since. A checkpoint older than pinning
    has its split recomputed, with a warning."""
    pin = checkpoint_pin(state, out / "last.pt") if state is not None else None
    if pin is not None:
        train_idx, unused = pin.select("training", data.subjects, data.label_map, str(data.root))
        val_idx, val_unused = pin.select("validation", val_data.subjects, val_data.label_map, str(val_data.root))
        unused = unused - len(val_idx) if val_data is data else unused + val_unused
        if unused and main:
            print(f"note: {unused} subject(s) of the data are not in the run's pinned split ({out / 'splits.json'}) "
                  f"and are not used by this resumed run", flush=True)
        return train_idx, val_idx, pin
    if state is not None and main:
        print(f"warning: {out / 'last.pt'} predates pinned splits: its split is recomputed from the subject count "
              f"(the same only if the dataset is unchanged)", file=sys.stderr, flush=True)
    if val_data is data:
        train_idx, val_idx = config.split_indices(len(data.subjects))
    else:
        train_idx, val_idx = list(range(len(data.subjects))), list(range(len(val_data.subjects)))
    pin = DataPin(_pinned(data, train_idx), _pinned(val_data, val_idx), config.split, config.seed)
    if main and (state is None or not (out / "splits.json").exists()):
        text = pin.to_json()
        write_atomic(out / "splits.json", lambda tmp: Path(tmp).write_text(text), ".json")
    return train_idx, val_idx, pin
