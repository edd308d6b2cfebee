"""The chapter's training curves and a confusion matrix, drawn with matplotlib's file-only backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from vgg_dist.atomic import write_atomically
from vgg_dist.metrics import accuracy, sample_count

matplotlib.use("Agg")  # files only: works on machines with no display, inside any launcher
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(epochs: list[dict], steps: list[dict], path_stem: Path) -> list[Path]:
    """Train loss, train accuracy and test accuracy against epoch, as d2l's Animator draws them.

    `epochs` are metrics.jsonl records; `steps` are fractional-epoch train points ({"epoch", "train_loss",
    "train_acc"}), drawn as the lines, with the per-epoch values as markers. Writes .png and .svg.
    """
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if steps:
        x = [point["epoch"] for point in steps]
        axis.plot(x, [point["train_loss"] for point in steps], color="tab:blue", label="train loss")
        axis.plot(x, [point["train_acc"] for point in steps], color="tab:purple", linestyle="--", label="train acc")
    else:
        x = [record["epoch"] for record in epochs]
        axis.plot(x, [record["train_loss"] for record in epochs], color="tab:blue", marker="o", label="train loss")
        axis.plot(x, [record["train_acc"] for record in epochs], color="tab:purple", linestyle="--", marker="o",
                  label="train acc")
    axis.plot([record["epoch"] for record in epochs], [record["test_acc"] for record in epochs], color="tab:green",
              linestyle="-.", marker="s", label="test acc")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss / accuracy")
    last_epoch = max([record["epoch"] for record in epochs] + [1])
    axis.set_xlim(0, last_epoch)
    axis.grid(True, alpha=0.3)
    axis.legend(loc="best")
    if epochs:
        final = epochs[-1]
        axis.set_title(f"loss {final['train_loss']:.3f}, train acc {final['train_acc']:.3f}, "
                       f"test acc {final['test_acc']:.3f}", fontsize=10)
    return _save(figure, path_stem)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path_stem: Path) -> list[Path]:
    """Row-normalised confusion matrix (rows: true class) with the counts written in each cell."""
    size = len(class_names)
    figure, axis = plt.subplots(figsize=(1.0 + 0.62 * size, 0.8 + 0.55 * size), dpi=120)
    totals = [max(sum(row), 1) for row in confusion]
    shares = [[count / total for count in row] for row, total in zip(confusion, totals)]
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(size), class_names, rotation=45, ha="right")
    axis.set_yticks(range(size), class_names)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    for row in range(size):
        for column in range(size):
            axis.text(column, row, str(confusion[row][column]), ha="center", va="center", fontsize=7,
                      color="white" if shares[row][column] > 0.5 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the true class")
    axis.set_title(f"test accuracy {accuracy(confusion):.3f} on {sample_count(confusion)} images", fontsize=10)
    return _save(figure, path_stem)


def _save(figure, path_stem: Path) -> list[Path]:
    figure.tight_layout()
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".svg")]
    for path in paths:  # a viewer refreshing the file never sees half a picture
        write_atomically(path, lambda temporary: figure.savefig(temporary, format=path.suffix[1:]))
    plt.close(figure)
    return paths
