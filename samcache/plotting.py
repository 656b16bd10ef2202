"""Figures written as files: matplotlib without a display, saved atomically; the training curves."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from samcache.fileio import atomic_write_bytes


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # servers have no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int) -> None:
    # Through atomic_write_bytes: a full disk is an OutputError and never leaves half a picture.
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_training_curves(metrics_path: str | Path, out_path: str | Path) -> None:
    """Loss per step (raw and smoothed) and validation mIoU per epoch, from metrics.jsonl."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    plt = pyplot()
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        x = np.array([r["global_step"] for r in steps])
        y = np.array([r["loss"] for r in steps])
        ax_loss.plot(x, y, color="tab:blue", alpha=0.3, label="loss")
        window = max(1, len(y) // 20)
        if window > 1:
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            ax_loss.plot(x[window - 1 :], smooth, color="tab:blue", label=f"mean of {window}")
        ax_loss.plot(x, [r["train_iou"] for r in steps], color="tab:green", alpha=0.5, label="train IoU (low-res)")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training")
    ax_loss.legend()
    ax_iou.plot([r["epoch"] for r in epochs], [r["val_miou"] for r in epochs], marker="o", color="tab:orange")
    ax_iou.set_xlabel("epoch (0 = before training)")
    ax_iou.set_ylabel("validation mIoU")
    ax_iou.set_title("validation")
    ax_iou.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_path, dpi=100)
