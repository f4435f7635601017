"""The trainer: the paper's training strategy (section 2.3) on one device, resumable.

Configuration lives in TrainConfig; `train(config)` runs it. Per epoch: NAdam steps over the shuffled
training split with batch size 1 and the rigid augmentation on the device, then the validation hard
Dice per label (on the device), one JSON line in log.jsonl, the plots (dice_curve.png, overlay.png)
and dice_table.md refreshed, and the `last` and `best` checkpoints, written atomically. Every random draw comes from torch generators whose states are checkpointed, so
a resumed run continues exactly (bitwise in deterministic mode on the CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from expseg_fast import distributed
from expseg_fast.atomic import write_atomic
from expseg_fast.data import AugmentConfig, LabelMap, augment, find_pairs, preprocess_pair, random_splits, validate
from expseg_fast.data import demo
from expseg_fast.losses import LossSpec, label_counts, label_weights, loss as loss_fn
from expseg_fast.models import ExpLogNet, NetConfig, VNet

LOSSES = {  # name -> LossSpec factory from (gamma_dice, gamma_cross, w_dice, w_cross)
    "exp": lambda gd, gc, wd, wc: LossSpec(wd, wc, gd, gc),
    "log_dice": lambda gd, gc, wd, wc: LossSpec(1.0, 0.0, gd, 1.0),
    "linear_dice": lambda gd, gc, wd, wc: LossSpec(1.0, 0.0, 1.0, 1.0, True),
    "cross": lambda gd, gc, wd, wc: LossSpec(0.0, 1.0, 1.0, gc),
}


@dataclass
class TrainConfig:
    out: str = "runs/demo"
    data: str | None = None  # dataset folder or list; None: the synthetic demo dataset
    label_map: str | None = None
    demo_preset: str = "cpu"
    size: int = 48
    model: str = "ours"  # ours | vnet
    width: int = 12
    fuse_levels: tuple[int, ...] = (0, 1, 2)
    loss: str = "exp"
    gamma_dice: float = 0.3
    gamma_cross: float = 0.3
    w_dice: float = 0.8
    w_cross: float = 0.2
    epochs: int = 12
    lr: float = 1e-3
    precision: str = "fp32"  # fp32 | bf16 | fp16 (with a grad scaler)
    channels_last: bool = False
    augment_probability: float = 0.8
    seed: int = 0
    splits: int = 5
    split: int = 0
    device: str = "auto"
    deterministic: bool = False
    limit_subjects: int | None = None  # use only the first N subjects (tests, quick looks)
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        problems = []
        if self.model not in ("ours", "vnet"):
            problems.append(f"model must be 'ours' or 'vnet', got {self.model!r}")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            problems.append(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.size < 16 or self.size % 16:
            problems.append(f"size must be a multiple of 16 (>= 16), got {self.size}")
        elif self.model == "vnet" and self.size < 32:  # its 1-voxel bottom level cannot batch-normalise a batch of 1
            problems.append(f"size must be >= 32 for V-Net (4 halvings), got {self.size}")
        if self.epochs < 1 or self.lr <= 0 or self.width < 1:
            problems.append("epochs >= 1, lr > 0 and width >= 1 required")
        if not 0 <= self.split < self.splits:
            problems.append(f"split must be in [0, {self.splits}), got {self.split}")
        if problems:
            raise ValueError("; ".join(problems))


def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def dataset(config: TrainConfig, out: Path):
    """(pairs, label map) of a run writing to out: its data, or the demo dataset built once beside out."""
    if config.data is None:
        settings = demo.PRESETS[config.demo_preset]
        if config.limit_subjects:  # build only what is used
            settings = dataclasses.replace(settings, subjects=max(2, config.limit_subjects))
        root = demo.build(out.parent / f"demo-data-{config.demo_preset}-{settings.subjects}", settings)
        label_map = LabelMap.from_json(root / "label_map.json")
        pairs = find_pairs(root)
    else:
        pairs = find_pairs(config.data)
        label_map = LabelMap.from_json(config.label_map) if config.label_map else None
        if label_map is None:
            raise ValueError("--label-map is required with --data (it names the classes)")
    if config.limit_subjects:
        pairs = pairs[: config.limit_subjects]
    validate(pairs, label_map)  # every problem at once, before anything is written
    return pairs, label_map


def build_model(config: TrainConfig, num_labels: int) -> torch.nn.Module:
    """The network a TrainConfig describes, with num_labels outputs."""
    if config.model == "vnet":
        return VNet(num_labels=num_labels, width=config.width)
    return ExpLogNet(NetConfig(num_labels=num_labels, width=config.width, fuse_levels=tuple(config.fuse_levels)))


def hard_dice(pred: torch.Tensor, target: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Per-label hard Dice (C,) of two label volumes; NaN where a label is absent from both."""
    p = torch.nn.functional.one_hot(pred.reshape(-1), num_labels).sum(0).double()
    g = torch.nn.functional.one_hot(target.reshape(-1), num_labels).sum(0).double()
    match = pred.reshape(-1) == target.reshape(-1)
    inter = torch.bincount(target.reshape(-1)[match], minlength=num_labels).double()
    denominator = p + g
    return torch.where(denominator > 0, 2 * inter / denominator.clamp_min(1), torch.full_like(inter, math.nan))


def load_checkpoint(path: Path) -> dict:
    """Loads a checkpoint with weights_only=True: one carrying arbitrary pickled objects is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a loadable expseg_fast checkpoint (refused: {error})") from error


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Runs (or, with resume, continues) the training; returns the last epoch's record."""
    config.check()
    out = Path(config.out)
    device = _device(config)
    rank, world = distributed.setup(device.type)
    device = distributed.device_for(device)
    main = rank == 0  # only the first process writes
    torch.use_deterministic_algorithms(config.deterministic)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not config.deterministic  # fixed shapes
    if not main:
        distributed.barrier()  # the first process builds the demo data and the cache
    pairs, label_map = dataset(config, out)  # scanned before anything of the run is written
    if main:
        out.mkdir(parents=True, exist_ok=True)
    num_labels = len(label_map.names)
    train_idx, val_idx = random_splits(len(pairs), config.splits, seed=config.seed)[config.split]
    cache = out.parent / "cache"
    samples = [preprocess_pair(p, label_map, config.size, cache) for p in pairs]
    to_tensor = lambda s: (  # noqa: E731
        torch.from_numpy(s.image)[None, None].to(device), torch.from_numpy(s.labels.astype("int64"))[None].to(device)
    )
    data = [to_tensor(s) for s in samples]
    if main:
        distributed.barrier()
    counts = label_counts([torch.from_numpy(samples[i].labels) for i in train_idx], num_labels)
    weights = label_weights(counts.clamp_min(1)).to(device)  # labels absent from the split get the largest weight
    spec = LOSSES[config.loss](config.gamma_dice, config.gamma_cross, config.w_dice, config.w_cross)

    torch.manual_seed(config.seed)
    model = build_model(config, num_labels).to(device)
    memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.NAdam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
    aug_gen = torch.Generator().manual_seed(config.seed + 1 + rank)
    order_gen = torch.Generator().manual_seed(config.seed + 2)
    start_epoch, best = 0, -1.0
    if resume and (out / "last.pt").exists():
        state = load_checkpoint(out / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        aug_gen.set_state(state["aug_rng"])
        order_gen.set_state(state["order_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start_epoch, best = int(state["epoch"]) + 1, float(state["best"])
        if main:  # a kill between the log line and the checkpoint left a record the run will redo
            _keep_log_before(out / "log.jsonl", start_epoch)
    elif main:
        (out / "log.jsonl").write_text("")
    history = _read_log(out / "log.jsonl") if main else []
    if main:
        print(f"training {config.model} on {len(train_idx)} subjects, validating on {len(val_idx)}, {config.size}^3, "
              f"{config.epochs} epochs, {config.loss} loss, {config.precision} on {device} x {world}; output in {out}",
              flush=True)
    record: dict = {}
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        clock = PhaseClock(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model.train()
        losses = []
        order = torch.randperm(len(train_idx), generator=order_gen).tolist()
        shard = order[rank::world][: len(order) // world]  # equal shards: every process steps alike
        for step, i in enumerate(shard, start=1):
            if main and sys.stderr.isatty():  # a progress bar with ETA on a terminal
                done = step - 1
                eta = f"{(time.perf_counter() - started) / done * (len(shard) - done):.0f} s" if done else "?"
                bar = "#" * (20 * done // len(shard))
                print(f"\r  epoch {epoch + 1} [{bar:<20}] {done}/{len(shard)}  ETA {eta}", end="", file=sys.stderr)
            image, labels = data[train_idx[i]]
            clock.lap("data")
            image, labels = augment(image, labels, aug_gen, AugmentConfig(probability=config.augment_probability))
            clock.lap("augment")
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = net(image.contiguous(memory_format=memory_format))
            value = loss_fn(logits, labels, weights, spec, validate=False)
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(value.detach()))
            clock.lap("step")
        if main and sys.stderr.isatty():
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
        model.eval()
        dice = []
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for j in val_idx[rank::world]:
                image, labels = data[j]
                pred = model(image.contiguous(memory_format=memory_format)).argmax(1)
                dice.append(hard_dice(pred, labels, num_labels))
                if j == val_idx[0]:
                    pred_first = pred
        dice = [d.cpu() for d in distributed.gather(dice)]
        losses = distributed.gather(losses)
        clock.lap("validation")
        per_label = torch.stack(dice)[:, 1:]  # without background, like the paper
        mean = float(per_label.nanmean())
        record = {
            "epoch": epoch,
            "train_loss": sum(losses) / len(losses),
            "train_steps": len(shard),
            "val_dice_mean": mean,
            "val_dice_per_label": [float(x) for x in per_label.nanmean(0)],
            "val_dice_std_per_label": [float(x) for x in _nanstd(per_label)],
            "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        best = max(best, mean)
        if not main:
            continue
        history.append(record)
        _write_reports(out, label_map.names, data[val_idx[0]], pred_first, history)
        clock.lap("report")
        record["phase_seconds"] = clock.seconds
        record["seconds"] = time.perf_counter() - started
        with (out / "log.jsonl").open("a") as log:
            log.write(json.dumps(record) + "\n")
        eta = record["seconds"] * (config.epochs - epoch - 1)
        print(f"epoch {epoch + 1}/{config.epochs}  loss {record['train_loss']:.4f}  val Dice {mean:.3f}  "
              f"{record['seconds']:.1f} s  ETA {eta / 60:.1f} min", flush=True)
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "best": best, "aug_rng": aug_gen.get_state(), "order_rng": order_gen.get_state(),
            "torch_rng": torch.get_rng_state(), "config": json.dumps(asdict(config)), "class_names": list(label_map.names),
        }
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        write_atomic(out / "last.pt", lambda tmp: torch.save(state, tmp), ".pt")
        if mean >= best:
            write_atomic(out / "best.pt", lambda tmp: torch.save(state, tmp), ".pt")
    distributed.teardown()
    if not main:
        return record
    if record:
        print((out / "dice_table.md").read_text())
    print(f"done: log {out / 'log.jsonl'}, checkpoints {out / 'last.pt'} and {out / 'best.pt'}, plots "
          f"{out / 'dice_curve.png'} and {out / 'overlay.png'}, table {out / 'dice_table.md'}", flush=True)
    return record


def _write_reports(out: Path, names: tuple[str, ...], case, prediction: torch.Tensor, records: list[dict]) -> None:
    """Refreshes dice_curve.png (Fig. 3), overlay.png (Fig. 4) and dice_table.md from the epoch records."""
    from expseg_fast import report

    report.plot_dice_curve(records, out / "dice_curve.png")
    image, labels = case
    report.plot_overlay(image[0, 0].float().cpu().numpy(), labels[0].cpu().numpy(), prediction[0].cpu().numpy(),
                        out / "overlay.png", len(names))
    write_atomic(out / "dice_table.md", lambda tmp: Path(tmp).write_text(report.label_table(records[-1], names)), ".md")


def _read_log(path: Path) -> list[dict]:
    """The epoch records of log.jsonl."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class PhaseClock:
    """Wall-clock seconds per phase of an epoch (data, augment, step, validation, report); on CUDA each
    lap waits for the queued kernels so that device time lands in the phase that launched it."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> float:
        """Adds the time since the previous lap to `phase`; returns it."""
        self.sync()
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
        return elapsed


def _keep_log_before(path: Path, epoch: int) -> None:
    """Drops the records of epochs >= epoch from the log (atomically)."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] < epoch]
    if len(kept) != len(lines):
        write_atomic(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)), ".jsonl")


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    mean = x.nanmean(0, keepdim=True)
    return ((x - mean) ** 2).nanmean(0).sqrt()
