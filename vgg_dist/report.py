"""What a run reports: the per-epoch record of metrics.jsonl, accuracy and the per-class report from a
confusion matrix (rows: true class, columns: predicted), and the curves and confusion matrix as pictures.

The pictures use matplotlib's object API (`Figure`), which renders without pyplot: no backend to
choose, no display needed and no global state, so it works on any machine and inside any launcher.
matplotlib is imported only when a picture is drawn.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vgg_dist.store.files import write_atomically


@dataclasses.dataclass(kw_only=True)
class EpochRecord:
    """One line of metrics.jsonl. The val_* fields exist only with --val-split; examples_per_sec is None
    for an epoch resumed at its very last step, peak_memory_bytes without a GPU."""

    epoch: int
    train_loss: float
    train_acc: float
    train_samples: int
    lr: float
    val_loss: float | None = None
    val_acc: float | None = None
    val_samples: int | None = None
    test_loss: float
    test_acc: float
    test_samples: int
    examples_per_sec: float | None
    seconds: float
    eval_seconds: float
    global_step: int
    peak_memory_bytes: int | None

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if self.val_acc is None:
            for name in ("val_loss", "val_acc", "val_samples"):
                del values[name]
        return values

    def judged(self) -> tuple[str, float]:
        """The metric the best checkpoint is chosen on: validation accuracy when there is a validation
        split, never the test set's then."""
        return ("val_acc", self.val_acc) if self.val_acc is not None else ("test_acc", self.test_acc)


@dataclasses.dataclass(kw_only=True)
class CurvePoint:
    """One line of train_curve.jsonl: the running train loss and accuracy of the global batch."""

    epoch: float  # fractional: 1.4 is 40% into the second epoch
    global_step: int
    train_loss: float
    train_acc: float
    lr: float


Confusion = list[list[int]]


def sample_count(confusion: Confusion) -> int:
    return sum(map(sum, confusion))


def accuracy(confusion: Confusion) -> float:
    """Share of samples on the diagonal; 0.0 for an empty matrix."""
    total = sample_count(confusion)
    return sum(confusion[i][i] for i in range(len(confusion))) / total if total else 0.0


def per_class_report(confusion: Confusion, class_names: list[str]) -> dict:
    """report.json's contents: overall accuracy, per-class recall and precision, and the matrix."""
    classes = []
    for index, name in enumerate(class_names):
        support = sum(confusion[index])
        predicted = sum(row[index] for row in confusion)
        classes.append({
            "class": name,
            "support": support,
            "recall": confusion[index][index] / support if support else None,
            "precision": confusion[index][index] / predicted if predicted else None,
        })
    return {"test_acc": accuracy(confusion), "test_samples": sample_count(confusion), "classes": classes,
            "confusion": {"rows": "true class", "columns": "predicted class", "class_names": list(class_names),
                          "matrix": confusion}}


def plot_curves(epochs: list[dict], steps: list[dict], path_stem: Path) -> list[Path]:
    """Train loss and accuracy, test (and validation) accuracy and loss against epoch, as d2l's
    Animator draws them, with the learning rate on a second axis. Writes .png and .svg.

    `epochs` are metrics.jsonl records; `steps` are fractional-epoch train points ({"epoch",
    "train_loss", "train_acc", "lr"}), drawn as the train lines, with the per-epoch values as markers.
    """
    from matplotlib.figure import Figure
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
    from matplotlib.figure import Figure
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


def _save(figure, path_stem: Path) -> list[Path]:
    figure.tight_layout()
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".svg")]
    for path in paths:  # a viewer refreshing the file never sees half a picture
        write_atomically(path, lambda temporary: figure.savefig(temporary, format=path.suffix[1:], bbox_inches="tight"))
    return paths
