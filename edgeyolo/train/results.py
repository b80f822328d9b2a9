"""The run folder's ``results.csv`` (one row per epoch) and ``results.png`` (its curves)."""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ["epoch", "box_loss", "obj_loss", "cls_loss", "lr", "mAP50-95", "mAP50", "epoch_seconds",
           "train_images_per_s"]


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in COLUMNS})


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def truncate(path: Path, epochs_done: int) -> None:
    """Keep the rows of the first ``epochs_done`` epochs (a resumed run rewrites what follows)."""
    rows = [r for r in read_rows(path) if r["epoch"] < epochs_done]
    if path.exists():
        path.unlink()
    for r in rows:
        append_row(path, {**r, "epoch": int(r["epoch"])})


def plot(csv_path: Path, png_path: Path) -> None:
    """One panel per column: losses, learning rate, mAPs, epoch time (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(2, 4, figsize=(14, 6), tight_layout=True)  # 8 panels: 8 columns after epoch
    for ax, key in zip(axes.ravel(), COLUMNS[1:]):
        ax.plot(epochs, [r[key] for r in rows], marker=".")
        ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
