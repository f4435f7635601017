"""Every default in one place: the presets (`synth-cpu` and `synth-paper`, the generator's, which the main
command trains; `cpu`, `cpu-bf16` and `paper`, which a run on the demo or the user's own data takes; and the
GPU suite's `smoke`) and the training configuration whose defaults they set; `main_preset` picks this
machine's.

A preset names, for one kind of machine, the synthetic demo data it builds, its training (scripts/train.py)
and the Table 1 experiment's settings (scripts/reproduce_table1.py). TrainConfig's
defaults are the `cpu` preset's; `TrainConfig.for_preset(name)` gives another's. The command-line
defaults of the scripts come from here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from expseg_fast import machine
from expseg_fast.data.augment import AugmentConfig
from expseg_fast.data.demo import DemoSettings
from expseg_fast.data.nifti import MAX_VOXELS
from expseg_fast.data.plans import PLANS, Plan, plan_of
from expseg_fast.data.source import SYNTH, DataLocation, Dataset, open_dataset
from expseg_fast.data.splits import random_splits
from expseg_fast.data.synth import CONTRASTS, SynthSettings
from expseg_fast.losses import LossSpec
from expseg_fast.models import build_model
from expseg_fast.models.norms import NORMS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype
PRECISIONS = tuple(DTYPES)
PREPROCESSINGS = tuple(PLANS)
LR_SCHEDULES = ("constant", "poly")  # the learning rate over the epochs (TrainConfig.lr_at)
POLY_EXPONENT = 0.9  # poly: lr x (1 - epoch / epochs)^0.9, nnU-Net's schedule
STEP_MODES = ("eager", "compiled", "cuda_graph")  # the forms of a training step (expseg_fast/training/step.py)
MODELS = ("ours", "vnet")
VALIDATION, COLIN27 = "validation", "colin27"  # the figures that can choose best.pt (training/selection.py)
SELECT_ON = ("auto", VALIDATION, COLIN27)
BOTTOM_FACTOR = {"ours": 8, "vnet": 16}  # cube edge / the edge of the network's bottom level
INPUT_PATHS = ("data", "label_map", "val_data", "val_label_map")  # TrainConfig's fields that name files or folders read


@dataclass(frozen=True)
class Table1Settings:
    """Table 1's settings shared by every case. demo: the preset whose demo data the runs use; widths:
    ours (paper 24) and V-Net (original 16); subjects: only the first N of the demo dataset (None: all)."""

    demo: str
    size: int
    width_ours: int
    width_vnet: int
    epochs: int
    splits: int
    precision: str
    channels_last: bool
    subjects: int | None = None


@dataclass(frozen=True)
class Preset:
    """demo: the synthetic demo data; size, width, epochs, precision, channels_last: the main command's
    training; table1: the Table 1 experiment."""

    demo: DemoSettings
    size: int
    width: int
    epochs: int
    precision: str
    channels_last: bool
    table1: Table1Settings
    demo_of: str | None = None  # the preset whose demo data this one shares (None: its own)
    settings: tuple[tuple[str, object], ...] = ()  # further TrainConfig settings of the main command


_CPU_DEMO = DemoSettings(spacing_mm=3.0, field_of_view_mm=None)  # coarse voxels, a tight field of view
PRESETS = {
    # a CPU without bf16 units: the demo's training in minutes (48^3), Table 1 at 32^3 with widths halved
    # (times: results/table1-cpu/)
    "cpu": Preset(_CPU_DEMO, 48, 12, 12, "fp32", False, Table1Settings("cpu", 32, 12, 8, 32, 5, "fp32", False)),
    # the paper's setting on a GPU: 128^3 in a field of view where background is about the paper's share
    "paper": Preset(DemoSettings(spacing_mm=2.0, field_of_view_mm=290.0), 128, 24, 100, "bf16", True,
                    Table1Settings("paper", 128, 24, 16, 100, 5, "bf16", True)),
    # the GPU suite's CI rehearsal (bench/gpu_suite.sh --smoke): one epoch of two subjects; figures mean nothing
    "smoke": Preset(_CPU_DEMO, 32, 4, 1, "fp32", False, Table1Settings("cpu", 32, 4, 4, 1, 5, "fp32", False, 2)),
}
# a CPU that multiplies bf16 natively: bf16 + channels-last steps faster than fp32 (bench/cpu_precision.py,
# bench/NOTES.md), spent on more epochs at 48^3 in the cpu preset's time, which beat fewer at 64^3
# (results/table1-cpu/ablations.md, section 5)
PRESETS["cpu-bf16"] = dataclasses.replace(PRESETS["cpu"], size=48, epochs=32, precision="bf16", channels_last=True,
                                          demo_of="cpu")
# images drawn from 20 real subjects' label maps (expseg_fast/data/synth.py), segmenting real T1 scans: voxels of
# 2 mm (chosen by a perfect model's bound on a real FreeSurfer-labelled scan and by the same run at 2 and 2.5 mm
# on both real scans: results/real-scans/README.md), the 64^3 window (128 mm), the generator's own spatial
# augmentation instead of the trainer's; 14 training maps x 4 draws an epoch, as many epochs as fit the main
# command's hour on a 2-core CPU with bf16 units (times: bench/NOTES.md); the poly learning rate and instance
# norm, each chosen by real-scan Dice, and best.pt chosen among the schedule's last tenth: in each of six runs
# an epoch chosen earlier scored below the last on the FreeSurfer-labelled scan (results/real-scans/README.md)
_SYNTH = (("data", SYNTH), ("out", "runs/synth"), ("preprocessing", "spacing"), ("spacing_mm", 2.0),
          ("augment_probability", 0.0), ("synth_repeats", 4), ("lr_schedule", "poly"), ("norm", "instance"),
          ("select_last", 0.1))
PRESETS["synth-cpu"] = dataclasses.replace(PRESETS["cpu-bf16"], size=64, epochs=200, settings=_SYNTH)
# the same on a GPU at the paper's width: 1.5 mm voxels, 128^3 (192 mm)
PRESETS["synth-paper"] = dataclasses.replace(PRESETS["paper"], size=128, epochs=300, demo_of="paper",
                                             settings=tuple((k, 1.5 if k == "spacing_mm" else v) for k, v in _SYNTH))
_DEFAULT = PRESETS["cpu"]


def main_preset(cuda: bool, own_data: bool = False) -> str:
    """The preset of a run that names none. The main command (no --data, or --data synth) trains on images
    drawn from the 20 real subjects' label maps, so that its model segments real T1 scans (the atlas
    demo's does not: results/real-scans/README.md): `synth-paper` on a GPU, `synth-cpu` on the CPU. A
    run on the user's own data (own_data) takes the machine's: `paper` on a GPU; on the CPU `cpu-bf16`
    where the processor multiplies bf16 natively (machine.cpu_bf16_units), else `cpu`."""
    if not own_data:
        return "synth-paper" if cuda else "synth-cpu"
    return "paper" if cuda else ("cpu-bf16" if machine.cpu_bf16_units() else "cpu")


def preset_precision(name: str, size: int, model: str, device_type: str) -> tuple[str, str | None]:
    """(precision, note): the preset's precision for a run of that size and model on device_type, or
    fp32 with a note saying why where the preset's cannot train there (TrainConfig.device_problem) or
    is bf16 on a CPU that does not multiply bf16 natively (machine.cpu_bf16_units; fp32 steps faster)."""
    precision = PRESETS[name].precision
    problem = TrainConfig(precision=precision, size=size, model=model).device_problem(device_type)
    if not problem and precision == "bf16" and device_type == "cpu" and not machine.cpu_bf16_units():
        problem = "this processor does not multiply bf16 natively (no avx512_bf16 or amx_bf16 flag)"
    if problem:
        return "fp32", f"{problem}; training in fp32 (the {name} preset's {precision} does not apply)"
    return precision, None

LOSSES = {  # --loss name -> its LossSpec from (gamma_dice, gamma_cross, w_dice, w_cross, eps)
    "exp": lambda gd, gc, wd, wc, eps: LossSpec.exp_log(wd, wc, gd, gc, eps),
    "log_dice": lambda gd, gc, wd, wc, eps: LossSpec.log_dice(gd, eps),
    "linear_dice": lambda gd, gc, wd, wc, eps: LossSpec.linear(eps),
    "cross": lambda gd, gc, wd, wc, eps: LossSpec.cross(gc),
}


@dataclass(frozen=True)
class PredictorDefaults:
    """The Predictor's defaults (expseg_fast/inference/predictor.py): precision, channels-last, a CUDA
    graph on CUDA, BatchNorm folding, torch.compile; flip: test-time flip averaging
    (expseg_fast/inference/mirroring.py); window_batch: windows per call when segment.py and evaluate.py
    slide over a scan."""

    precision: str = "bf16"
    channels_last: bool = True
    cuda_graph: bool = True
    fold_bn: bool = False  # BatchNorm folded into the convolutions (bench/NOTES.md: no gain on the CPU yet)
    compiled: bool = False  # torch.compile (slower on the CPU so far: bench/NOTES.md; the GPU is to measure)
    flip: bool = False  # segment.py and evaluate.py average each window with its left-right mirror
    window_batch: tuple[tuple[str, int], ...] = (("cuda", 4), ("cpu", 1))


PREDICTOR = PredictorDefaults()
WINDOW_BATCH = dict(PREDICTOR.window_batch)

# settings a resumed run may take from the command line (a moved dataset: its pinned identity is checked)
RESUME_MAY_CHANGE = ("epochs", "device", "deterministic", "loader_workers", "data", "label_map", "max_voxels",
                     "keep_checkpoints", "val_data", "val_label_map")
VALIDATION_DATA = ("val_data", "val_label_map")  # of those: only where the run had --val-data (moved)
_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),),
          "tuple[int, ...]": (tuple, list)}


_LOSS = LossSpec()  # the loss's defaults: the paper's best L_Exp


def _option(default, help: str, choices=None, command_line: bool = True):
    """A TrainConfig field with its documentation, which scripts/train.py turns into an option."""
    return field(default=default, metadata={"help": help, "choices": choices, "command_line": command_line})


@dataclass
class TrainConfig:
    """One training run: what the trainer reads, what a checkpoint stores (as JSON). Each field's help is
    its command-line option's (scripts/train.py generates the options from the fields)."""

    out: str = _option("runs/demo", "output folder: checkpoints, log, plots (the demo data and the cache go "
                                    "beside it)")
    data: str | None = _option(None, "dataset folder (imagesTr/, labelsTr/) or .json/.csv list, or `synth`: images "
                                     "drawn from 20 real subjects' label maps (SynthSeg); default: the synthetic "
                                     "demo dataset")
    label_map: str | None = _option(None, "JSON label map naming the classes (required with --data)")
    demo_preset: str = _option("cpu", "the preset whose demo data the run uses", tuple(PRESETS), command_line=False)
    size: int = _option(_DEFAULT.size, "edge of the training cube in voxels (a multiple of 16)")
    model: str = _option("ours", "network: ours (the paper's) or vnet", MODELS)
    width: int = _option(_DEFAULT.width, "channels of the network's first level (the paper: 24)")
    fuse_levels: tuple[int, ...] = _option((0, 1, 2), "decoder levels fused for deep supervision (0: full "
                                                      "resolution; the paper: 0 1 2)")
    norm: str = _option("batch", "normalisation after each convolution: batch (the paper's BatchNorm) or instance "
                                 "(per image, the same in training and inference; nnU-Net's)", NORMS)
    loss: str = _option("exp", "loss: exp (L_Exp), log_dice (L_Dice), linear_dice, cross (L_Cross)", tuple(LOSSES))
    gamma_dice: float = _option(_LOSS.gamma_dice, "γ of the Dice term")
    gamma_cross: float = _option(_LOSS.gamma_cross, "γ of the cross-entropy term")
    w_dice: float = _option(_LOSS.w_dice, "weight of the Dice term in L_Exp")
    w_cross: float = _option(_LOSS.w_cross, "weight of the cross-entropy term in L_Exp")
    eps: float = _option(_LOSS.eps, "Dice smoothing epsilon (the paper's 1)")
    epochs: int = _option(_DEFAULT.epochs, "epochs to train (in all, counting those a resumed run has done)")
    lr: float = _option(1e-3, "NAdam learning rate (the first epoch's)")
    lr_schedule: str = _option("constant", "the learning rate over the epochs: constant, or poly: lr x (1 - epoch / "
                                           "epochs)^0.9 each epoch (nnU-Net's; it follows --epochs, also when a "
                                           "resumed run changes them)", LR_SCHEDULES)
    ema_decay: float = _option(0.0, "an exponential moving average of the weights, which validation, best.pt and "
                                    "inference use: the share of the average kept at each step (0: none; 0.999: about "
                                    "the last 1000 steps; expseg_fast/training/averaging.py)")
    precision: str = _option(_DEFAULT.precision, "fp32, bf16 or fp16 (with a grad scaler)", PRECISIONS)
    channels_last: bool = _option(_DEFAULT.channels_last, "channels-last 3D memory format")
    augment_probability: float = _option(0.8, "probability of the rigid augmentation of a step's subject")
    augment_rotation_deg: float = _option(30.0, "largest rotation (degrees) about the axial axis")
    augment_shift: float = _option(0.2, "largest shift, as a fraction of the extent along each axis")
    augment_scale_min: float = _option(0.8, "smallest isotropic scaling")
    augment_scale_max: float = _option(1.2, "largest isotropic scaling")
    seed: int = _option(0, "seed of every random draw (model, split, order, augmentation)")
    splits: int = _option(5, "number of random 70/30 splits drawn")
    split: int = _option(0, "which of the random 70/30 splits")
    device: str = _option("auto", "auto (CUDA where a GPU is seen), cpu or cuda")
    deterministic: bool = _option(False, "deterministic algorithms (bitwise repeatable on the CPU)")
    limit_subjects: int | None = _option(None, "only the first N subjects (N >= 2; tests, quick looks)")
    loader_workers: int = _option(2, "background processes reading the subjects from the cache (0: the trainer's own)")
    in_channels: int = _option(1, "image channels per case (the trainer sets it from the data)", command_line=False)
    preprocessing: str = _option("fit", "fit: the paper's (pad to a cube, resize to --size); spacing: voxels of "
                                        "--spacing-mm, the --size cube cropped around the foreground "
                                        "(segment.py then slides windows over whole scans)", PREPROCESSINGS)
    spacing_mm: float = _option(1.0, "voxel size (mm) of --preprocessing spacing")
    max_voxels: int = _option(MAX_VOXELS, "the most voxels a scan may have; larger ones are reported with the "
                                          "dataset's problems")
    keep_checkpoints: bool = _option(False, "also keep every epoch's checkpoint (OUT/epoch_NNN.pt), for studies")
    val_data: str | None = _option(None, "validate on this dataset folder or list (e.g. real scans) instead of a "
                                         "split of --data; all of --data is then trained on")
    val_label_map: str | None = _option(None, "the JSON label map of --val-data (its classes a subset of --data's; "
                                              "\"unlisted\": \"ignore\" leaves other ids unscored)")
    select_on: str = _option("auto", "the validation figure that chooses best.pt: validation (the run's own: its "
                                     "split, --val-data, or the generated validation images), colin27 (--data "
                                     "synth: Colin27's T1 scored through its AAL labels, from Debian's mricron-data, "
                                     "besides the run's own), or auto: colin27 where --data synth without --val-data "
                                     "finds mricron-data, else validation", SELECT_ON)
    select_last: float = _option(1.0, "the share of the epochs, counted from the last, among which best.pt is "
                                      "chosen (1: all; the synth presets 0.1, the poly schedule's last tenth); "
                                      "before it begins best.pt is the best epoch so far")
    synth_contrast: str = _option("t1", "--data synth: the generator's contrasts: t1 (the T1 priors) or random "
                                        "(any contrast)", CONTRASTS)
    synth_repeats: int = _option(4, "--data synth: images drawn from each training label map per epoch")
    synth_partial_volume: int = _option(1, "--data synth: the map's points per axis of a voxel whose mixture the "
                                           "voxel averages (1: its centre's class; 2: 2^3 points, the partial "
                                           "volume of a real scan's coarse voxels, about 3x the generator's time)")
    step_mode: str = _option("eager", "the training step: eager, compiled (torch.compile of forward and backward) "
                                      "or cuda_graph (the whole step replayed from one CUDA graph; CUDA, batch 1)",
                             STEP_MODES)

    @classmethod
    def for_preset(cls, name: str, **overrides) -> "TrainConfig":
        """The main command's configuration on a preset's machine, with overrides."""
        p = PRESETS[name]
        values = dict(demo_preset=p.demo_of or name, size=p.size, width=p.width, epochs=p.epochs, precision=p.precision,
                      channels_last=p.channels_last, **dict(p.settings))
        return cls(**{**values, **overrides})

    @staticmethod
    def command_line_fields() -> list[dataclasses.Field]:
        """The fields scripts/train.py offers as options (all but those the run sets itself)."""
        return [f for f in dataclasses.fields(TrainConfig) if f.metadata["command_line"]]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        """The configuration a checkpoint stored; keys of older versions that no longer exist are ignored."""
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known})
        config.fuse_levels = tuple(config.fuse_levels)
        return config

    def resume_differences(self, saved: "TrainConfig") -> tuple[list[str], list[str]]:
        """(changes a resumed run refuses, changes it applies) between the run's saved configuration and
        this one, each "name=value (the run has saved)". The output folder may move; more epochs, another
        device or deterministic mode change no result already written."""
        refused, applied = [], []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(saved, f.name)
            if f.name == "out" or mine == theirs:
                continue
            if f.name in VALIDATION_DATA and saved.val_data is None:
                refused.append(f"{f.name}={mine!r} (the run validates on a split of its own data, which a resumed run "
                               f"keeps; only a run that had --val-data may take it again, moved)")
                continue
            (applied if f.name in RESUME_MAY_CHANGE else refused).append(f"{f.name}={mine!r} (the run has {theirs!r})")
        return refused, applied

    def device_problem(self, device_type: str, processes: int = 1) -> str | None:
        """Why this configuration cannot train on device_type (with that many processes), or None: bf16
        on the CPU at a 2^3 bottom level, where oneDNN's bf16 conv3d weight gradient reads uninitialised
        memory (bench/NOTES.md); a CUDA-graph step off CUDA, with fp16's grad scaler or under torchrun."""
        if self.step_mode == "cuda_graph" and (device_type != "cuda" or self.precision == "fp16" or processes > 1):
            return (f"step_mode cuda_graph needs one CUDA device and fp32 or bf16 (got {device_type}, "
                    f"{self.precision}, {processes} process(es))")
        if device_type == "cpu" and self.precision == "bf16" and self.size // BOTTOM_FACTOR[self.model] <= 2:
            return (f"precision bf16 on the CPU needs size > {2 * BOTTOM_FACTOR[self.model]} for {self.model}, got "
                    f"{self.size}: oneDNN's bf16 conv3d weight gradient is unreliable at the network's 2^3 bottom "
                    f"level")
        return None

    def with_paths(self, change: Callable[[str], str], fields: tuple[str, ...] = INPUT_PATHS) -> "TrainConfig":
        """This configuration with change applied to each of fields that names a file or folder (set, and
        not `synth`)."""
        return dataclasses.replace(self, **{k: change(v) for k in fields
                                            if (v := getattr(self, k)) is not None and v != SYNTH})

    def with_absolute_paths(self) -> "TrainConfig":
        """This configuration with its INPUT_PATHS absolute (a checkpoint never re-reads them against
        another current folder)."""
        return self.with_paths(lambda v: str(Path(v).resolve()))

    def network(self, num_labels: int) -> nn.Module:
        """The untrained network of this configuration (model, width, fused levels, input channels, norm)
        with num_labels outputs: image (N, in_channels, D, H, W) -> logits (N, num_labels, D, H, W)."""
        return build_model(self.model, num_labels, self.width, self.fuse_levels, self.in_channels, self.norm)

    def plan(self) -> Plan:
        """The preprocessing plan of this configuration (expseg_fast/data/plans.py)."""
        return plan_of(self.preprocessing, self.size, self.spacing_mm)

    @property
    def memory_format(self) -> torch.memory_format:
        """The memory format of the network's weights and inputs (channels_last)."""
        return torch.channels_last_3d if self.channels_last else torch.contiguous_format

    def augment_config(self) -> AugmentConfig:
        """The rigid augmentation of this configuration (expseg_fast/data/augment.py)."""
        return AugmentConfig(self.augment_probability, self.augment_rotation_deg, self.augment_shift,
                             (self.augment_scale_min, self.augment_scale_max))

    def synth_settings(self) -> SynthSettings:
        """The label-map generator's settings (its defaults in SynthSettings, the contrast and the partial
        volume from here)."""
        return SynthSettings(contrast=self.synth_contrast, partial_volume=self.synth_partial_volume)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch (0-based, < epochs) under the schedule."""
        if self.lr_schedule == "poly":
            return self.lr * (1 - epoch / self.epochs) ** POLY_EXPONENT
        return self.lr

    def split_indices(self, subjects: int) -> tuple[list[int], list[int]]:
        """(training, validation) indices of this run's split (`split` of `splits` random 70/30 splits,
        from `seed`) of a dataset of that many subjects: what a new run pins, and what a checkpoint older
        than pinning is taken to have used."""
        return random_splits(subjects, self.splits, seed=self.seed)[self.split]

    def loss_spec(self) -> LossSpec:
        return LOSSES[self.loss](self.gamma_dice, self.gamma_cross, self.w_dice, self.w_cross, self.eps)

    def demo_settings(self) -> DemoSettings:
        return PRESETS[self.demo_preset].demo

    def location(self, data: str | None, label_map: str | None, run_folder: Path) -> DataLocation:
        """Where data with its label map lies, None being this configuration's demo dataset: built once, and
        found again, beside the run folder (in its parent)."""
        return DataLocation(data, label_map, self.demo_settings(), self.demo_preset, Path(run_folder).absolute().parent)

    def open_data(self, data: str | None, label_map: str | None, run_folder: Path, *, limit_subjects: int | None = None,
                  plan: Plan | None = None, max_voxels: int = MAX_VOXELS) -> Dataset:
        """open_dataset (data/source.py) of data with its label map at this configuration's location()."""
        return open_dataset(self.location(data, label_map, run_folder), limit_subjects, plan, max_voxels)

    def check(self) -> None:
        """Raises ValueError naming every setting that is out of range or of the wrong type."""
        problems = self._type_problems()
        if problems:  # the range checks below need the types right
            raise ValueError("; ".join(problems))
        for f in dataclasses.fields(self):  # every option with declared choices
            choices = f.metadata["choices"]
            if choices is not None and getattr(self, f.name) not in choices:
                problems.append(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if self.size < 16 or self.size % 16:
            problems.append(f"size must be a multiple of 16 (>= 16), got {self.size}")
        elif self.model == "vnet" and self.size < 32:  # its 1-voxel bottom level cannot batch-normalise a batch of 1
            problems.append(f"size must be >= 32 for V-Net (4 halvings), got {self.size}")
        elif self.size**3 > self.max_voxels:
            problems.append(f"size^3 must be at most max_voxels ({self.max_voxels}), got {self.size}^3")
        for name in ("lr", "spacing_mm"):
            if not 0 < getattr(self, name) < math.inf:
                problems.append(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        problems += LossSpec.problems(self.w_dice, self.w_cross, self.gamma_dice, self.gamma_cross, self.eps)
        if not 0 <= self.augment_probability <= 1:
            problems.append(f"augment_probability must be in [0, 1], got {self.augment_probability}")
        if not (0 <= self.augment_rotation_deg <= 180 and 0 <= self.augment_shift < 1
                and 0 < self.augment_scale_min <= self.augment_scale_max < math.inf):
            problems.append(f"augmentation: rotation in [0, 180] degrees, shift in [0, 1) and 0 < scale_min <= "
                            f"scale_max required, got {self.augment_rotation_deg}, {self.augment_shift}, "
                            f"[{self.augment_scale_min}, {self.augment_scale_max}]")
        for name, low in (("epochs", 1), ("width", 1), ("loader_workers", 0), ("max_voxels", 1), ("in_channels", 1)):
            if getattr(self, name) < low:
                problems.append(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.limit_subjects is not None and self.limit_subjects < 2:
            problems.append(f"limit_subjects must be >= 2 (a training and a validation subject), got "
                            f"{self.limit_subjects}")
        if not set(self.fuse_levels) <= {0, 1, 2, 3} or not self.fuse_levels:
            problems.append(f"fuse_levels must be some of 0, 1, 2, 3, got {list(self.fuse_levels)}")
        if self.data == SYNTH and self.label_map is not None:
            problems.append("label_map does not apply to data synth (its classes are the packaged label maps')")
        if (self.val_data is None) != (self.val_label_map is None):
            problems.append("val_data and val_label_map go together")
        if self.select_on == "colin27" and (self.data != SYNTH or self.val_data is not None):
            problems.append("select_on colin27 needs data synth without val_data (Colin27 is scored on the "
                            "generator's classes, beside the generated validation images)")
        if not 0 < self.select_last <= 1:
            problems.append(f"select_last must be in (0, 1], got {self.select_last}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.synth_partial_volume < 1:
            problems.append(f"synth_partial_volume must be >= 1, got {self.synth_partial_volume}")
        if self.synth_repeats < 1:
            problems.append(f"synth_repeats must be >= 1, got {self.synth_repeats}")
        if self.splits < 1 or not 0 <= self.split < self.splits:
            problems.append(f"split must be in [0, {self.splits}), got {self.split}")
        if problems:
            raise ValueError("; ".join(problems))

    def _type_problems(self) -> list[str]:
        """A setting whose value is not of its declared type (a hand-edited checkpoint, say)."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = sum((_TYPES[t.strip()] for t in str(f.type).split("|")), ())
            wrong = not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
            if not wrong and isinstance(value, (tuple, list)):
                wrong = not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            if wrong:
                problems.append(f"{f.name} must be of type {f.type}, got {value!r}")
        return problems
