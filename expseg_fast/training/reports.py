"""Training reports: validation Dice vs epoch (the paper's Fig. 3), slice overlays of a validation case
(Fig. 4) and the per-label table, refreshed during a run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from expseg_fast.atomic import write_atomic  # noqa: E402


def _save(fig, path: Path) -> None:
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), ".png")
    plt.close(fig)


def plot_dice_curve(records: list[dict], path: Path) -> None:
    """Mean validation Dice (without background) per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] + 1 for r in records]
    ax.plot(epochs, [r["val_dice_mean"] for r in records], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice (mean over labels)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, path: Path, num_labels: int) -> None:
    """Axial, coronal and sagittal middle slices: ground truth (top) and prediction (bottom) over the image."""
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    cmap = plt.get_cmap("tab20", num_labels)
    centre = [s // 2 for s in image.shape]
    for col, axis in enumerate((2, 1, 0)):
        take = lambda v: np.rot90(np.take(v, centre[axis], axis=axis))  # noqa: E731
        for row, (labels, title) in enumerate(((truth, "ground truth"), (prediction, "prediction"))):
            ax = axes[row, col]
            ax.imshow(take(image), cmap="gray")
            masked = np.ma.masked_equal(take(labels), 0)
            ax.imshow(masked, cmap=cmap, vmin=0, vmax=num_labels - 1, alpha=0.5, interpolation="nearest")
            ax.set_title(title if col == 0 else "")
            ax.axis("off")
    _save(fig, path)


def label_table(record: dict, names: tuple[str, ...]) -> str:
    """Markdown table of the validation Dice per label (mean ± std) of one epoch record."""
    lines = ["| label | Dice (mean ± std) |", "|---|---|"]
    for name, mean, std in zip(names[1:], record["val_dice_per_label"], record["val_dice_std_per_label"]):
        lines.append(f"| {name} | {mean:.3f} ± {std:.3f} |")
    lines.append(f"| **average** | {record['val_dice_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def write_reports(out: Path, names: tuple[str, ...], case: tuple, prediction, records: list[dict]) -> None:
    """Refreshes dice_curve.png (Fig. 3), overlay.png (Fig. 4) of a validation case (image (1, K, ...),
    labels (1, ...) and its prediction (1, ...), tensors) and dice_table.md from the epoch records."""
    plot_dice_curve(records, out / "dice_curve.png")
    image, labels = case
    plot_overlay(image[0, 0].float().cpu().numpy(), labels[0].cpu().numpy(), prediction[0].cpu().numpy(),
                 out / "overlay.png", len(names))
    write_atomic(out / "dice_table.md", lambda tmp: Path(tmp).write_text(label_table(records[-1], names)), ".md")
