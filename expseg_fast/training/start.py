"""Everything a run needs before its first step, in one `Run` of three parts: what the run is (its checked
configuration, preprocessing plan and pinned data: the scanned data — a dataset, or the packaged label maps
for the generator, and the data it validates on — with its pinned split and the sources of its subjects,
training/subject_sources.py), where it works (training/place.py) and what it holds (the model, optimizer,
step, random generators and counters), restored from the last checkpoint when the run resumes. Option
errors (a resumed run's differences included) come before the data is read; the data's problems before
anything of the run is written."""

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
from expseg_fast.config import COLIN27, DTYPES, TrainConfig
from expseg_fast.data.identity import DataPin, PinnedSubjects, label_map_digest
from expseg_fast.data.loader import prepare
from expseg_fast.data.plans import Plan
from expseg_fast.data.source import SYNTH, Dataset, open_synth
from expseg_fast.losses import label_weights
from expseg_fast.machine import keep_freed_memory, torch_device
from expseg_fast.runlog import read_log
from expseg_fast.training import distributed, run_state, selection
from expseg_fast.training.averaging import WeightAverage
from expseg_fast.training.place import Place
from expseg_fast.training.run_folder import RunError, RunFolder
from expseg_fast.training.selection import RealCheck
from expseg_fast.training.step import TrainStep
from expseg_fast.training.subject_sources import CacheSource, SynthSource


@dataclass
class PinnedData:
    """What a run trains and validates on. data/val_data: the training and validation data (one dataset for
    a split of it; val_data.lacking: the classes its labels do not have, not scored); train_idx/val_idx:
    the pinned subjects (indices of train_source and val_source) and pin, their record; data_range: what
    segment.py warns outside of; real_check: a real scan scored besides the validation (Colin27), or None."""

    data: Dataset
    val_data: Dataset
    train_idx: list[int]
    val_idx: list[int]
    pin: DataPin
    train_source: CacheSource | SynthSource
    val_source: CacheSource | SynthSource
    data_range: dict
    real_check: RealCheck | None

    @property
    def names(self) -> tuple[str, ...]:
        """The class names (the training data's label map)."""
        return tuple(self.data.label_map.names)


@dataclass
class Training:
    """What a run holds and changes as it trains: the model (net: wrapped for DDP under torchrun), its
    optimizer, grad scaler and step, the augmentation's and the order's generators, the epoch it starts
    at, and the best figure of best_by so far with its epoch; history: the log's records (main process);
    average: the weights' moving average where the run keeps one."""

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: TrainStep
    aug_gen: torch.Generator
    order_gen: torch.Generator
    best_by: str  # the figure that chooses best.pt
    average: WeightAverage | None = None  # the weights' moving average (TrainConfig.ema_decay), or None
    start_epoch: int = 0
    best: float = -1.0
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The network that validation scores and checkpoints hold for inference: the average, where kept."""
        return self.average.model if self.average is not None else self.model


@dataclass
class Run:
    """A run between its epochs: what it is (config, plan, pinned), where it works (place) and what it holds
    (training)."""

    config: TrainConfig
    plan: Plan
    pinned: PinnedData
    place: Place
    training: Training

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.config.precision]

    @property
    def memory_format(self) -> torch.memory_format:
        return self.config.memory_format


def start(config: TrainConfig, resume: bool, folder: RunFolder) -> Run:
    """The run of config in folder (new, or resumed from its last.pt); ValueError / RunError naming
    what keeps it from starting."""
    config.check()
    config = config.with_absolute_paths()  # never re-read against another current folder
    place = _place(config)
    problem = config.device_problem(place.device.type, place.world)
    if problem:  # before anything is written
        raise ValueError(problem)
    last = place.out / "last.pt"
    state = load_checkpoint(last) if resume and last.exists() else None
    if state is not None:  # option errors before the data is read or preprocessed
        run_state.check_resume(config, state, last, place.main)
    torch.use_deterministic_algorithms(config.deterministic)
    torch.backends.cudnn.benchmark = place.device.type == "cuda" and not config.deterministic  # fixed shapes
    if place.device.type == "cpu":
        keep_freed_memory()  # each step's activations reuse the last one's memory (bench/NOTES.md)
    if not place.main:
        distributed.barrier()  # the first process builds the demo data and the cache
    plan = config.plan()
    datasets = _datasets(config, place.out, plan)  # scanned before anything is written
    if place.main:
        folder.open(resume)  # locked; a new run never replaces one, resume needs a checkpoint
    config = dataclasses.replace(config, in_channels=datasets[0].channels)  # a property of the data
    chosen_by = selection.best_by(config, state)
    pinned = _pinned_data(config, plan, place, datasets, state, chosen_by == COLIN27)
    if place.main:
        distributed.barrier()
    run = Run(config, plan, pinned, place, _training(config, place, pinned, chosen_by))
    if state is not None:
        run_state.restore(run, state)
    elif place.main:
        (place.out / "log.jsonl").write_text("")
    run.training.history = read_log(place.out / "log.jsonl") if place.main else []
    return run


def _place(config: TrainConfig) -> Place:
    """The run's folder, and its device and rank among torchrun's processes (set up now)."""
    device = torch_device(config.device)
    rank, world = distributed.setup(device.type)
    return Place(Path(config.out), distributed.device_for(device), rank, world)


def _pinned_data(config: TrainConfig, plan: Plan, place: Place, datasets: tuple[Dataset, Dataset],
                 state: dict | None, colin27: bool) -> PinnedData:
    """The run's pinned split of its data and the sources of its subjects (the cache prepared now), with
    Colin27's check where it chooses best.pt."""
    data, val_data = datasets
    train_idx, val_idx, pin = pinned_split(config, data, val_data, state, place)
    with _cache_space():
        train_source, val_source = _sources(config, plan, data, val_data, val_idx, place)
        check = selection.colin27_check(config, plan, data, place) if colin27 else None
    return PinnedData(data, val_data, train_idx, val_idx, pin, train_source, val_source,
                      train_source.data_range(train_idx), check)


def _training(config: TrainConfig, place: Place, pinned: PinnedData, best_by: str) -> Training:
    """The run's label weights, model, optimizer, step and generators (seeded: a new run's start)."""
    num_labels = len(pinned.names)
    counts = pinned.train_source.label_counts(pinned.train_idx, num_labels)
    weights = label_weights(counts.clamp_min(1)).to(place.device)  # labels absent from the split: the largest
    torch.manual_seed(config.seed)
    memory_format = config.memory_format
    model = config.network(num_labels).to(place.device).to(memory_format=memory_format)
    net = torch.nn.parallel.DistributedDataParallel(model) if place.world > 1 else model
    graphed = config.step_mode == "cuda_graph"  # the graph reads the scheduled learning rate from the device
    lr = torch.tensor(config.lr, device=place.device) if graphed else config.lr
    optimizer = torch.optim.NAdam(model.parameters(), lr=lr, capturable=graphed)
    scaler = torch.amp.GradScaler(place.device.type, enabled=config.precision == "fp16")
    step = TrainStep(model, net, optimizer, scaler, weights, config.loss_spec(), DTYPES[config.precision],
                     memory_format, config.step_mode)
    aug_gen, order_gen = torch.Generator(), torch.Generator()
    aug_gen.manual_seed(config.seed + 1 + place.rank)
    order_gen.manual_seed(config.seed + 2)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    return Training(model, net, optimizer, scaler, step, aug_gen, order_gen, best_by, average)


def _datasets(config: TrainConfig, out: Path, plan: Plan) -> tuple[Dataset, Dataset]:
    """(the training data, the validation data: the same dataset for a split of it), each scanned; the
    validation data's label map aligned to the training classes."""
    if config.data == SYNTH:
        data = open_synth(config.limit_subjects)
    else:
        data = config.open_data(config.data, config.label_map, out, limit_subjects=config.limit_subjects, plan=plan,
                                max_voxels=config.max_voxels)
    if config.val_data is None:
        return data, data
    val = config.open_data(config.val_data, config.val_label_map, out, plan=plan, max_voxels=config.max_voxels)
    val.label_map, val.lacking = val.label_map.aligned_to(data.label_map.names, config.val_label_map)
    if val.channels != data.channels:
        raise ValueError(f"{config.val_data}: {val.channels} channel(s) per case, the training data has "
                         f"{data.channels}")
    return data, val


def _sources(config: TrainConfig, plan: Plan, data: Dataset, val_data: Dataset, val_idx: list[int], place: Place):
    """(the training source, the validation source): the generator for synth, else the data's cache
    (prepared now: subjects missing from it are preprocessed)."""
    if data.maps:
        train = SynthSource(data.maps, data.label_map, plan, config.synth_settings(), place.device, config.seed,
                            val_idx if val_data is data else [], config.synth_repeats)
    else:
        train = CacheSource(prepare(data.pairs, data.label_map, plan, place.cache, report=place.main), place.device,
                            config.loader_workers)
    if val_data is data:
        return train, train
    return train, CacheSource(prepare(val_data.pairs, val_data.label_map, plan, place.cache, report=place.main),
                              place.device, 0)


@contextmanager
def _cache_space() -> Iterator[None]:
    """A full disk while the cache is prepared (the run's subjects, Colin27's check) becomes the RunError
    that says nothing half-written was kept."""
    try:
        yield
    except NoSpaceError as error:
        raise RunError(f"{error}; nothing half-written was kept: free some space and run again") from error


def _pinned(data: Dataset, indices: list[int]) -> PinnedSubjects:
    return PinnedSubjects(str(data.root), str(data.label_map_file) if data.label_map_file else None,
                          label_map_digest(data.label_map), tuple(data.subjects[i] for i in indices))


def pinned_split(config: TrainConfig, data: Dataset, val_data: Dataset, state: dict | None,
                 place: Place) -> tuple[list[int], list[int], DataPin]:
    """(training indices, validation indices, the pin) of a run: a new run draws its split (one of
    `splits` random 70/30 splits of the data, or all of it with separate validation data) and pins it
    with the data's identity in OUT/splits.json; a resumed one takes the pinned subjects from the data as
    it is now (ValueError naming what changed), never one added since. A checkpoint older than pinning
    has its split recomputed, with a warning."""
    out = place.out
    pin = checkpoint_pin(state, out / "last.pt") if state is not None else None
    if pin is not None:
        train_idx, unused = pin.select("training", data.subjects, data.label_map, str(data.root))
        val_idx, val_unused = pin.select("validation", val_data.subjects, val_data.label_map, str(val_data.root))
        unused = unused - len(val_idx) if val_data is data else unused + val_unused
        if unused and place.main:
            print(f"note: {unused} subject(s) of the data are not in the run's pinned split ({out / 'splits.json'}) "
                  f"and are not used by this resumed run", flush=True)
        return train_idx, val_idx, pin
    if state is not None and place.main:
        print(f"warning: {out / 'last.pt'} predates pinned splits: its split is recomputed from the subject count "
              f"(the same only if the dataset is unchanged)", file=sys.stderr, flush=True)
    if val_data is data:
        train_idx, val_idx = config.split_indices(len(data.subjects))
    else:
        train_idx, val_idx = list(range(len(data.subjects))), list(range(len(val_data.subjects)))
    pin = DataPin(_pinned(data, train_idx), _pinned(val_data, val_idx), config.split, config.seed)
    if place.main and (state is None or not (out / "splits.json").exists()):
        text = pin.to_json()
        write_atomic(out / "splits.json", lambda tmp: Path(tmp).write_text(text), ".json")
    return train_idx, val_idx, pin
