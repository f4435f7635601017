"""Which validation figure chooses best.pt (TrainConfig.select_on): the run's own validation Dice, or, for
a run on the label-map generator, Colin27's — a real T1 (Debian's mricron-data, read in place) scored
through its manual AAL labels on the classes they share with the generator's (8 of 17), on its training
cube (the plan's grid, as the run's own validation); and among which epochs (TrainConfig.select_last: the
schedule's last share; before it begins, the best so far, so that best.pt exists after any epoch). The
figure is chosen when a run starts and kept in its checkpoints, so a resumed run chooses by the same one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from expseg_fast.config import COLIN27, VALIDATION, TrainConfig
from expseg_fast.data import anatomy
from expseg_fast.data.loader import prepare
from expseg_fast.data.plans import Plan
from expseg_fast.data.source import SYNTH, Dataset
from expseg_fast.training.place import Place
from expseg_fast.training.run_folder import RunError
from expseg_fast.training.subject_sources import CacheSource

if TYPE_CHECKING:
    from expseg_fast.training.start import Training

RECORD_KEYS = {VALIDATION: "val_dice_mean", COLIN27: "colin27_dice_mean"}  # each one's field of an epoch's record


@dataclass
class RealCheck:
    """A real scan scored each epoch besides the run's own validation: its cached training cube and the
    model's classes its labels lack (not scored)."""

    name: str
    source: CacheSource
    lacking: list[int]


def best_by(config: TrainConfig, state: dict | None) -> str:
    """The figure of a run (resumed: the one it started with)."""
    if state is not None:
        return str(state["best_by"])
    if config.select_on != "auto":
        return config.select_on
    found = anatomy.colin27_installed(anatomy.COLIN27)
    return COLIN27 if config.data == SYNTH and config.val_data is None and found else VALIDATION


def colin27_check(config: TrainConfig, plan: Plan, data: Dataset, place: Place) -> RealCheck:
    """Colin27 through the run's plan (prepared into the run's cache like any scan); RunError naming the
    package when mricron-data is not installed."""
    try:
        folder = anatomy.colin27_dataset(place.cache / "colin27")
    except FileNotFoundError as error:
        raise RunError(f"select_on colin27: {error}") from error
    protocol = anatomy.PROTOCOLS / "aal.json"
    scan = config.open_data(str(folder), str(protocol), place.cache, plan=plan, max_voxels=config.max_voxels)
    scan.label_map, lacking = scan.label_map.aligned_to(data.label_map.names, str(protocol))
    return RealCheck("Colin27", CacheSource(prepare(scan.pairs, scan.label_map, plan, place.cache, report=place.main),
                                            place.device, 0), lacking)


def figure(record: dict, chosen_by: str) -> float:
    """The epoch record's figure that chooses best.pt."""
    return float(record[RECORD_KEYS[chosen_by]])


def first_candidate(config: TrainConfig) -> int:
    """The first epoch (0-based) of the schedule's last share (select_last, at least one epoch) among which
    best.pt is chosen."""
    return config.epochs - max(1, round(config.select_last * config.epochs))


def update(config: TrainConfig, training: Training, record: dict, epoch: int) -> None:
    """Makes the epoch the best (training.best, best_epoch) when its figure is the best so far, or when it
    opens the last share and the best is from before it."""
    value, first = figure(record, training.best_by), first_candidate(config)
    if value >= training.best or epoch >= first > training.best_epoch:
        training.best, training.best_epoch = value, epoch


def describe(config: TrainConfig, chosen_by: str, check: RealCheck | None, names: tuple[str, ...] | list[str]) -> str:
    """The line the run prints at its start: which figure chooses best.pt, and among which epochs."""
    first = first_candidate(config)
    among = f", among epochs {first + 1}-{config.epochs} (before them: the best so far)" if first > 0 else ""
    if chosen_by == VALIDATION or check is None:
        return f"best.pt: the epoch of the best validation Dice{among}"
    scored = [n for i, n in enumerate(names) if i > 0 and i not in check.lacking]
    return (f"best.pt: the epoch of the best Dice on {check.name} (real T1, mricron-data; {len(scored)} classes: "
            f"{', '.join(scored)}), besides the validation Dice on generated images{among}")
