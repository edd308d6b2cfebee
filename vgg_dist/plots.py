"""The chapter's training curves and a confusion matrix, drawn to files.

matplotlib's object API (`Figure`) renders without pyplot, so there is no backend to choose, no
display needed and no global state: it works on any machine and inside any launcher.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from vgg_dist.atomic import write_atomically
from vgg_dist.metrics import accuracy, sample_count


def plot_curves(epochs: list[dict], steps: list[dict], path_stem: Path) -> list[Path]:
    """Train loss and accuracy, test (and validation) accuracy and loss against epoch, as d2l's
    Animator draws them, with the learning rate on a second axis. Writes .png and .svg.

    `epochs` are metrics.jsonl records; `steps` are fractional-epoch train points ({"epoch",
    "train_loss", "train_acc", "lr"}), drawn as the train lines, with the per-epoch values as markers.
    """
    figure = Figure(figsize=(6.4, 4.2), dpi=120)
    axis = figure.subplots()
    train = steps or epochs
    style = {} if steps else {"marker": "o"}
    x = [point["epoch"] for point in train]
    axis.plot(x, [point["train_loss"] for point in train], color="tab:blue", label="train loss", **style)
    axis.plot(x, [point["train_acc"] for point in train], color="tab:purple", linestyle="--", label="train acc",
              **style)
    at = [record["epoch"] for record in epochs]
    for split, color in (("val", "tab:orange"), ("test", "tab:green")):
        if epochs and f"{split}_acc" in epochs[-1]:
            axis.plot(at, [record[f"{split}_acc"] for record in epochs], color=color, linestyle="-.", marker="s",
                      label=f"{split} acc")
        if epochs and f"{split}_loss" in epochs[-1]:
            axis.plot(at, [record[f"{split}_loss"] for record in epochs], color=color, linestyle=":", marker="^",
                      label=f"{split} loss")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss / accuracy")
    axis.set_xlim(0, max(at + [1]))
    axis.grid(True, alpha=0.3)
    if any("lr" in point for point in train):
        rate = axis.twinx()
        rate.plot(x, [point.get("lr") for point in train], color="tab:gray", linewidth=0.8, label="learning rate")
        rate.set_ylabel("learning rate", color="tab:gray")
        rate.set_ylim(bottom=0)
        rate.tick_params(axis="y", colors="tab:gray")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize=8, frameon=False)
    if epochs:
        final = epochs[-1]
        axis.set_title(f"loss {final['train_loss']:.3f}, train acc {final['train_acc']:.3f}, "
                       f"test acc {final['test_acc']:.3f}", fontsize=10)
    return _save(figure, path_stem)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path_stem: Path) -> list[Path]:
    """Row-normalised confusion matrix (rows: true class) with the counts written in each cell."""
    size = len(class_names)
    figure = Figure(figsize=(1.0 + 0.62 * size, 0.8 + 0.55 * size), dpi=120)
    axis = figure.subplots()
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


def _save(figure: Figure, path_stem: Path) -> list[Path]:
    figure.tight_layout()
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".svg")]
    for path in paths:  # a viewer refreshing the file never sees half a picture
        write_atomically(path, lambda temporary: figure.savefig(temporary, format=path.suffix[1:], bbox_inches="tight"))
    return paths
