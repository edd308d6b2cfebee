"""What a run writes into its directory as it goes; used on the global main process only.

    config.json          the run's description, rewritten with final metrics at the end (read back by
                         `artifacts.load_model`)
    train_config.yaml    the resolved flags, ready for `--config` to reproduce the recipe
    metrics.jsonl        one record per epoch
    train_curve.jsonl    fractional-epoch train loss/accuracy points for the curves
    curves.png/.svg      redrawn after every epoch
    report.json, confusion.png/.svg   per-class results of the final evaluation
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from vgg_dist.artifacts import CONFIG_NAME
from vgg_dist.atomic import append_jsonl, write_json, write_text
from vgg_dist.metrics import per_class_report

TRAIN_CONFIG_NAME = "train_config.yaml"
METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "train_curve.jsonl"
REPORT_NAME = "report.json"


class RunFiles:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._plots = self._import_plots()

    @staticmethod
    def _import_plots():
        """matplotlib draws the pictures; a machine without it still trains and keeps every record."""
        try:
            from vgg_dist import plots
        except ImportError as error:
            print(f"warning: no curves or confusion picture ({error}); pip install matplotlib", file=sys.stderr)
            return None
        return plots

    def write_run_info(self, info: dict) -> None:
        write_json(self.run_dir / CONFIG_NAME, info)

    def write_train_config(self, values: dict) -> None:
        text = ("# Reproduce this run's recipe: accelerate launch vgg_dist/train.py --config THIS_FILE "
                "--output-dir NEW\n")
        write_text(self.run_dir / TRAIN_CONFIG_NAME, text + yaml.safe_dump(values, sort_keys=False))

    def forget_after(self, epochs_done: int, global_step: int) -> None:
        """On resume: drop records the resumed run will produce again (they were written after its checkpoint)."""
        self._keep(METRICS_NAME, lambda record: record["epoch"] <= epochs_done)
        self._keep(CURVE_NAME, lambda record: record["global_step"] <= global_step)

    def _keep(self, name: str, wanted) -> None:
        path = self.run_dir / name
        if not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if wanted(json.loads(line))]
        if kept != lines:
            write_text(path, "".join(f"{line}\n" for line in kept))

    def add_curve_point(self, point: dict) -> None:
        append_jsonl(self.run_dir / CURVE_NAME, point)

    def add_epoch(self, record: dict) -> None:
        append_jsonl(self.run_dir / METRICS_NAME, record)
        if self._plots:
            self._plots.plot_curves(self._read(METRICS_NAME), self._read(CURVE_NAME), self.run_dir / "curves")

    def last_epoch(self) -> dict:
        records = self._read(METRICS_NAME)
        return records[-1] if records else {}

    def write_report(self, confusion: list[list[int]], class_names: list[str]) -> dict:
        report = per_class_report(confusion, class_names)
        write_json(self.run_dir / REPORT_NAME, report)
        if self._plots:
            self._plots.plot_confusion(confusion, class_names, self.run_dir / "confusion")
        return report

    def _read(self, name: str) -> list[dict]:
        path = self.run_dir / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
