"""The trainer: the paper's training strategy (section 2.3), resumable, on one device or several.

`train(config)` runs a TrainConfig (expseg_fast/config.py). Per epoch: NAdam steps over the shuffled
training split with batch size 1 and the rigid augmentation on the device, then the validation hard
Dice per label (on the device), one JSON line in log.jsonl (with the seconds spent in each phase), the
plots (dice_curve.png, overlay.png) and dice_table.md refreshed, and the `last` and `best` checkpoints
(expseg_fast/checkpoint.py), written atomically. Every random draw comes from torch generators whose
states are checkpointed, so a resumed run continues exactly (bitwise in deterministic mode on the
CPU). Under torchrun each process trains on its shard of every epoch (DistributedDataParallel),
validation is gathered, and only the first process writes.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from expseg_fast import distributed
from expseg_fast.atomic import write_atomic
from expseg_fast.atomic import NoSpaceError
from expseg_fast.checkpoint import (
    checkpoint_config,
    checkpoint_pin,
    load_checkpoint,
    non_finite_weights,
    save_checkpoint,
    to_bytes,
)
from expseg_fast.config import TrainConfig
from expseg_fast.data import AugmentConfig, augment, random_splits
from expseg_fast.data.identity import DataPin, label_map_digest
from expseg_fast.data.loader import CachedSubjects, OrderSampler, facts_range, prepare, subject_loader
from expseg_fast.data.source import Dataset, open_dataset
from expseg_fast.losses import label_counts, label_weights, loss as loss_fn
from expseg_fast.machine import torch_device
from expseg_fast.metrics import hard_dice, nanstd
from expseg_fast.models import build_model
from expseg_fast.run_folder import RunError, RunFolder
from expseg_fast.runlog import append_record, read_log, rewrite_log

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dataset(config: TrainConfig, out: Path) -> Dataset:
    """The scanned dataset of a run writing to out: its data, or the demo dataset built once beside out."""
    fit_size = config.size if config.preprocessing == "fit" else None  # what fitting to a cube would lose
    return open_dataset(config.data, config.label_map, config.demo_settings(), config.demo_preset, out.parent,
                        config.limit_subjects, fit_size, config.max_voxels)


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Runs (or, with resume, continues) the training; returns the last epoch's record. The process's
    deterministic-algorithms and cuDNN-autotuning settings are restored on return."""
    deterministic, benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    folder = RunFolder(Path(config.out))
    try:
        return _train(config, resume, folder)
    finally:
        folder.close()
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark


def _train(config: TrainConfig, resume: bool, folder: RunFolder) -> dict:
    config.check()
    config = config.with_absolute_paths()  # never re-read against another current folder
    out = Path(config.out)
    device = torch_device(config.device)
    rank, world = distributed.setup(device.type)
    device = distributed.device_for(device)
    problem = config.device_problem(device.type)
    if problem:  # before anything is written
        raise ValueError(problem)
    main = rank == 0  # only the first process writes
    state = load_checkpoint(out / "last.pt") if resume and (out / "last.pt").exists() else None
    if state is not None:  # option errors before the data is read or preprocessed
        _check_resume(config, state, out / "last.pt", main)
    torch.use_deterministic_algorithms(config.deterministic)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not config.deterministic  # fixed shapes
    if not main:
        distributed.barrier()  # the first process builds the demo data and the cache
    data = dataset(config, out)  # scanned before anything of the run is written
    pairs, label_map = data.pairs, data.label_map
    if main:
        folder.open(resume)  # locked; a new run never replaces one, resume needs a checkpoint
    config = dataclasses.replace(config, in_channels=len(pairs[0].images))  # a property of the data
    num_labels = len(label_map.names)
    train_idx, val_idx, pin = _pinned_split(config, data, state, out, main)
    # the preprocessed cache is the source: each step's subject is read from disk (memory-mapped) by
    # background workers; labels stay uint8 from disk to the loss
    try:
        entries = prepare(pairs, label_map, config.size, out.parent / "cache", report=main,
                          spacing_mm=config.spacing())
    except NoSpaceError as error:
        raise RunError(f"{error}; nothing half-written was kept: free some space and run again") from error
    if main:
        distributed.barrier()
    subjects = CachedSubjects(entries)
    sampler = OrderSampler()
    loader = subject_loader(subjects, sampler, config.loader_workers, pin=device.type == "cuda")

    def on_device(image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return image[None].to(device, non_blocking=True), labels[None].to(device, non_blocking=True)

    counts = sum(label_counts([subjects[i][1]], num_labels) for i in train_idx)  # one subject in memory at a time
    data_range = facts_range([entries[i] for i in train_idx])  # segment.py warns outside it
    weights = label_weights(counts.clamp_min(1)).to(device)  # labels absent from the split get the largest weight
    spec = config.loss_spec()

    torch.manual_seed(config.seed)
    model = build_model(config.model, num_labels, config.width, config.fuse_levels, config.in_channels).to(device)
    memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.NAdam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    dtype = DTYPES[config.precision]
    aug_gen = torch.Generator().manual_seed(config.seed + 1 + rank)
    order_gen = torch.Generator().manual_seed(config.seed + 2)
    start_epoch, best, best_epoch = 0, -1.0, -1
    if resume:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        aug_gen.set_state(state["aug_rng"])
        order_gen.set_state(state["order_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        start_epoch, best = int(state["epoch"]) + 1, float(state["best"])
        best_epoch = int(state.get("best_epoch", -1))
        if main:  # a kill between the log line and the checkpoint left a record the run will redo
            _keep_log_before(out / "log.jsonl", start_epoch)
            _repair_best(out, state)
    elif main:
        (out / "log.jsonl").write_text("")
    history = read_log(out / "log.jsonl") if main else []
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
        sampler.order = [train_idx[i] for i in shard]
        for step, (image, labels) in enumerate(loader, start=1):
            if main and sys.stderr.isatty():  # a progress bar with ETA on a terminal
                done = step - 1
                eta = f"{(time.perf_counter() - started) / done * (len(shard) - done):.0f} s" if done else "?"
                bar = "#" * (20 * done // len(shard))
                print(f"\r  epoch {epoch + 1} [{bar:<20}] {done}/{len(shard)}  ETA {eta}", end="", file=sys.stderr)
            image, labels = on_device(image, labels)
            clock.lap("data")
            image, labels = augment(image, labels, aug_gen, AugmentConfig(probability=config.augment_probability))
            clock.lap("augment")
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = net(image.contiguous(memory_format=memory_format))
            value = loss_fn(logits, labels, weights, spec, validate=False)
            scaler.scale(value).backward()
            if not scaler.is_enabled():  # fp16: the scaler skips steps with non-finite gradients itself
                _stop_if_diverged(value, model, epoch, step, out / "last.pt")
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
                image, labels = on_device(*subjects[j])
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
            "val_dice_std_per_label": [float(x) for x in nanstd(per_label)],
            "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        best = max(best, mean)
        if not main:
            continue
        history.append(record)
        bad = non_finite_weights(model.state_dict())
        if bad:  # fp16 runs reach here when the scaler could not keep the weights finite
            raise RunError(f"epoch {epoch + 1}: the weights became non-finite ({bad[0]}, ...); nothing of this "
                           f"epoch was saved, {out / 'last.pt'} holds the last finite one; try a lower --lr")
        try:
            _write_reports(out, label_map.names, on_device(*subjects[val_idx[0]]), pred_first, history)
            clock.lap("report")
            record["phase_seconds"] = clock.seconds
            record["seconds"] = time.perf_counter() - started
            append_record(out / "log.jsonl", record)
            if mean >= best:
                best_epoch = epoch
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "best": best, "best_epoch": best_epoch, "aug_rng": aug_gen.get_state(),
                "order_rng": order_gen.get_state(), "torch_rng": torch.get_rng_state(), "config": config.to_json(),
                "class_names": list(label_map.names), "data_range": json.dumps(data_range),
                "data_pin": pin.to_json(),
            }
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state()
            blob = to_bytes(state)
            save_checkpoint(out / "last.pt", blob)  # first: a kill before best.pt is repaired on resume
            if best_epoch == epoch:
                save_checkpoint(out / "best.pt", blob)
        except NoSpaceError as error:
            raise RunError(f"{error}; the previous checkpoint is intact ({out / 'last.pt'}): free some space "
                           f"and continue with --resume") from error
        eta = record["seconds"] * (config.epochs - epoch - 1)
        print(f"epoch {epoch + 1}/{config.epochs}  loss {record['train_loss']:.4f}  val Dice {mean:.3f}  "
              f"{record['seconds']:.1f} s  ETA {eta / 60:.1f} min", flush=True)
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


def _check_resume(config: TrainConfig, state: dict, path: Path, main: bool) -> None:
    """A resumed run keeps its configuration: ValueError naming every setting that differs, except those
    it may take (RESUME_MAY_CHANGE), which are applied with a message. The channel count is the data's."""
    saved = checkpoint_config(state, path)
    refused, applied = dataclasses.replace(config, in_channels=saved.in_channels).resume_differences(saved)
    if refused:
        raise ValueError(f"{path}: a resumed run keeps the configuration it was trained with, and this one "
                         f"differs: {'; '.join(refused)}; resume with the run's settings, or start a new --out")
    if applied and main:
        print(f"resuming {path.parent} with {'; '.join(applied)}", flush=True)


def _pinned_split(config: TrainConfig, data: Dataset, state: dict | None, out: Path,
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


def _repair_best(out: Path, last: dict) -> None:
    """A kill between writing last.pt and best.pt leaves best.pt one improvement behind: copy last.pt."""
    best_epoch, epoch = int(last.get("best_epoch", -1)), int(last["epoch"])
    if best_epoch != epoch:
        return
    best = out / "best.pt"
    if best.exists() and int(load_checkpoint(best)["epoch"]) == epoch:
        return
    save_checkpoint(best, (out / "last.pt").read_bytes())
    print(f"{best}: brought up to date with {out / 'last.pt'} (epoch {epoch + 1}, the best so far)", flush=True)


def _stop_if_diverged(value: torch.Tensor, model: torch.nn.Module, epoch: int, step: int, last: Path) -> None:
    """RunError when the loss or the gradients are not finite, before the optimizer step can spoil the weights."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    value = value.detach()
    finite = torch.isfinite(value) & torch.isfinite(norm)
    if not bool(finite):
        what = "the loss" if not bool(torch.isfinite(value)) else "the gradients"
        kept = f"{last} holds the last finite epoch" if last.exists() else "no checkpoint was written yet"
        raise RunError(f"epoch {epoch + 1}, step {step}: {what} became non-finite ({float(value):.4g}): the run "
                       f"diverged; {kept}; try a lower --lr")


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
    """Drops the records of epochs >= epoch (and a torn last line) from the log, atomically."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    kept = [r for r in read_log(path) if r["epoch"] < epoch]
    if len(kept) != len(lines):
        rewrite_log(path, kept)
