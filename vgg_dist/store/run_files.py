"""What a run writes into its directory as it goes (on the global main process only), and reads back.

    config.json          RunInfo: what the run is; rewritten with the final metrics at the end
    train_config.yaml    the resolved flags, ready for `--config` to reproduce the recipe
    metrics.jsonl        one EpochRecord per epoch
    train_curve.jsonl    CurvePoints: the running train loss/accuracy five times an epoch, for the curves
    curves.png/.svg      redrawn after every epoch
    report.json, confusion.png/.svg   per-class results of the final evaluation
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

import yaml

from vgg_dist.config import TRAIN_CONFIG_NAME, TrainConfig, config_file_values
from vgg_dist.data.sources import DataRecord
from vgg_dist.errors import UsageError
from vgg_dist.fields import FieldError, from_dict, short
from vgg_dist.model import ModelSpec
from vgg_dist.report import CurvePoint, EpochRecord, per_class_report, plot_confusion, plot_curves
from vgg_dist.store.files import FileError, append_jsonl, read_record, regular_file_size, write_json, write_text

CONFIG_NAME, METRICS_NAME, CURVE_NAME, REPORT_NAME = "config.json", "metrics.jsonl", "train_curve.jsonl", "report.json"
PICTURES = ("curves.png", "curves.svg", "confusion.png", "confusion.svg")
MAX_SOURCE_SIDE = 4096  # predict resizes a new image to the stored size first; beyond this it is not believable


@dataclasses.dataclass(kw_only=True)
class RunInfo:
    """config.json: what a run is. Written when it starts, again with the final metrics when it ends."""

    model: ModelSpec
    class_names: list[str]
    class_names_from: str                 # the dataset's own names, or the --class-names file
    dataset: str
    data_source: str
    source_image_size: list[int]          # [height, width] as stored; predict resizes a new image to it first
    background: float | None              # mean grey level (0-255) of the training images' borders
    train_samples: int
    train_samples_per_epoch: int          # whole global batches only: the remainder is left out each epoch
    val_samples: int | None
    test_samples: int
    flags: TrainConfig
    launch: dict[str, object]
    resumed_from: str | None = None
    final_metrics: EpochRecord | None = None
    weights_identical_across_ranks: bool | None = None
    data: DataRecord | None = None        # images decoded into the cache: fingerprint, cache hit, mean and std

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["final_metrics"] = self.final_metrics.to_dict() if self.final_metrics else None
        return values


def read_run_info(run_dir: Path) -> RunInfo:
    """A run's config.json, every field checked: it is a file anyone can edit."""
    path = Path(run_dir) / CONFIG_NAME
    info = read_record(path, RunInfo)
    try:
        info.model.check()
    except UsageError as error:
        raise FileError(f"{path}: {error}") from None
    if len(info.class_names) != info.model.num_classes:
        raise FileError(f"{path}: class_names must list {info.model.num_classes} names, one per class")
    if len(info.source_image_size) != 2 or not all(1 <= side <= MAX_SOURCE_SIDE for side in info.source_image_size):
        raise FileError(f"{path}: source_image_size must be [height, width], each 1 to {MAX_SOURCE_SIDE}")
    return info


class RunFiles:
    def __init__(self, run_dir: Path, say: Callable[[str], None] = print):
        self.run_dir, self.say = Path(run_dir), say
        self.draws = importlib.util.find_spec("matplotlib") is not None
        if not self.draws:
            say("warning: matplotlib is not installed, so no curves or confusion pictures; pip install matplotlib")

    def write_info(self, info: RunInfo) -> None:
        write_json(self.run_dir / CONFIG_NAME, info.to_dict())

    def write_train_config(self, config: TrainConfig) -> None:
        text = ("# Reproduce this run's recipe: accelerate launch vgg_dist/train.py --config THIS_FILE "
                "--output-dir NEW\n")
        write_text(self.run_dir / TRAIN_CONFIG_NAME, text + yaml.safe_dump(config_file_values(config), sort_keys=False))

    def records_to_keep(self, epochs_done: int, global_step: int) -> dict[str, list[str]]:
        """On resume, checked before anything is written: the lines of metrics.jsonl and train_curve.jsonl
        that the resumed run will not produce again. A torn last line (a crash mid-append) is dropped with a
        notice, since the checkpoint holds the truth; anything else unreadable is refused."""
        metrics = self._read(METRICS_NAME, EpochRecord)
        curve = self._read(CURVE_NAME, CurvePoint)
        return {METRICS_NAME: [line for line, record in metrics if record.epoch <= epochs_done],
                CURVE_NAME: [line for line, point in curve if point.global_step <= global_step]}

    def keep(self, lines: dict[str, list[str]]) -> None:
        for name, kept in lines.items():
            path = self.run_dir / name
            if path.exists() and path.read_text() != "".join(f"{line}\n" for line in kept):
                write_text(path, "".join(f"{line}\n" for line in kept))

    def add_curve_point(self, point: CurvePoint) -> None:
        append_jsonl(self.run_dir / CURVE_NAME, dataclasses.asdict(point))

    def add_epoch(self, record: EpochRecord) -> None:
        append_jsonl(self.run_dir / METRICS_NAME, record.to_dict())
        if self.draws:
            plot_curves([r.to_dict() for _, r in self._read(METRICS_NAME, EpochRecord)],
                        [dataclasses.asdict(p) for _, p in self._read(CURVE_NAME, CurvePoint)], self.run_dir / "curves")

    def last_epoch(self) -> EpochRecord | None:
        records = self._read(METRICS_NAME, EpochRecord)
        return records[-1][1] if records else None

    def write_report(self, confusion: list[list[int]], class_names: list[str]) -> None:
        write_json(self.run_dir / REPORT_NAME, per_class_report(confusion, class_names))
        if self.draws:
            plot_confusion(confusion, class_names, self.run_dir / "confusion")

    def _read(self, name: str, kind: type) -> list[tuple[str, object]]:
        path = self.run_dir / name
        if not os.path.lexists(path):
            return []
        regular_file_size(path)  # a FIFO would block the read for ever; a link would send the appends outside the run
        text = path.read_text(errors="replace")
        lines = text.splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append((line, from_dict(kind, json.loads(line), f"line {number}")))
            except (ValueError, FieldError, RecursionError) as error:
                if number == len(lines) and not text.endswith("\n"):
                    self.say(f"dropped the torn last line of {path} (a crash mid-write); the checkpoint "
                             f"holds what it recorded")
                    break
                raise FileError(f"{path}: line {number} is not a readable record ({short(str(error))}); restore "
                                f"the file or move the run aside") from None
        return records
