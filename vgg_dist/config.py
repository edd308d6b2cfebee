"""The one training configuration: a dataclass whose fields become the command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path

from vgg_dist.data import DATASETS
from vgg_dist.errors import UsageError
from vgg_dist.model import ModelSpec


def _field(default, help: str, **metadata):
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass
class TrainConfig:
    """Defaults reproduce d2l's VGG chapter: VGG-11, channels / 4, 224x224, SGD lr 0.05, batch 128, 10 epochs."""

    # Data
    data_dir: str | None = _field(None, "directory holding Zalando's four IDX files "
                                        "(default: load from the Hugging Face Hub)")
    dataset: str = _field("fashion_mnist", "which dataset", choices=tuple(DATASETS))
    max_train_samples: int | None = _field(None, "use only the first N training images (quick runs)")
    max_eval_samples: int | None = _field(None, "use only the first N test images (quick runs)")
    # Model
    arch: str = _field(ModelSpec.arch, "VGG depth")
    width_divisor: int = _field(ModelSpec.width_divisor, "divide every conv's channel count by this "
                                                         "(the chapter's ratio)")
    batch_norm: bool = _field(ModelSpec.batch_norm, "BatchNorm after every conv")
    hidden_size: int = _field(ModelSpec.hidden_size, "width of the two hidden fully connected layers")
    dropout: float = _field(ModelSpec.dropout, "dropout probability in the classifier "
                                               "(masks are drawn per process)")
    image_size: int = _field(ModelSpec.image_size, "resize images to this side, a multiple of 32")
    # Optimisation
    epochs: int = _field(10, "passes over the training set")
    batch_size: int = _field(128, "GLOBAL batch size, split evenly across processes, so 1 and N "
                                  "processes take the same optimizer steps")
    lr: float = _field(0.05, "SGD learning rate")
    momentum: float = _field(0.0, "SGD momentum (the chapter uses none)")
    seed: int = _field(0, "seed for weights, data order and dropout")
    # Output
    output_dir: str | None = _field(None, "run directory; must not already hold files unless resuming "
                                          "(default: runs/<timestamp>)")
    # Checkpoints and preemption
    checkpoint_every: int = _field(0, "also checkpoint every N optimizer steps (0: only at epoch ends)")
    checkpoint_epochs: bool = _field(True, "checkpoint at the end of every epoch")
    keep_last: int = _field(2, "keep the newest K checkpoints (0: keep all); the best is always kept")
    resume: str | None = _field(None, "'auto': continue from the newest complete checkpoint in "
                                      "--output-dir, or start fresh; or a checkpoint directory")
    requeue: bool = _field(False, "after a stop signal under SLURM, run `scontrol requeue $SLURM_JOB_ID`")
    dist_timeout: int = _field(600, "seconds a collective may wait for the other processes before the job "
                                    "fails (a dead rank ends the job instead of hanging)")
    sync_every: int = _field(10, "every N steps, all processes agree on stop signals and non-finite "
                                 "losses (one small collective; a checkpoint always checks first)")

    def model_spec(self, in_channels: int, num_classes: int) -> ModelSpec:
        return ModelSpec(arch=self.arch, width_divisor=self.width_divisor, batch_norm=self.batch_norm,
                         in_channels=in_channels, num_classes=num_classes, image_size=self.image_size,
                         hidden_size=self.hidden_size, dropout=self.dropout)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: str):
    """int from 'int | None', and so on: the type argparse should convert a flag's text to."""
    resolved = typing.get_type_hints(TrainConfig)[annotation]
    if isinstance(resolved, types.UnionType):
        resolved = next(arg for arg in typing.get_args(resolved) if arg is not type(None))
    return resolved


class FlagParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises UsageError, so it is reported once per job like every other."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    # No abbreviations: `--epoch 3` in a saved command must not silently mean `--epochs 3`.
    parser = FlagParser(prog=prog, description=description, allow_abbrev=False,
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(TrainConfig):
        kind = _base_type(field.name)
        options = {"default": field.default, "help": field.metadata["help"]}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = kind
            options["metavar"] = field.name.upper()
        if "choices" in field.metadata:
            options["choices"] = field.metadata["choices"]
        parser.add_argument(flag(field.name), **options)
    return parser


def parse_config(argv: list[str] | None, prog: str, description: str) -> TrainConfig:
    """Parse and validate flags; any problem is a UsageError naming the flag."""
    parser = build_parser(prog, description)
    namespace = parser.parse_args(argv)
    config = TrainConfig(**vars(namespace))
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Every check that needs neither the data nor the process group."""
    positive = ["epochs", "batch_size", "image_size", "width_divisor", "hidden_size",
                "max_train_samples", "max_eval_samples", "sync_every", "dist_timeout"]
    for name in positive:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UsageError(f"{flag(name)} must be a positive integer, got {value}")
    for name in ("checkpoint_every", "keep_last"):
        if getattr(config, name) < 0:
            raise UsageError(f"{flag(name)} must be 0 or more, got {getattr(config, name)}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {config.lr}")
    if not 0.0 <= config.momentum < 1.0:
        raise UsageError(f"--momentum must be in [0, 1), got {config.momentum}")
    # Shape problems (architecture, image size, divisor, dropout) are the model's to state.
    problems = config.model_spec(in_channels=1, num_classes=10).problems()
    if problems:
        name, message = problems[0]
        raise UsageError(f"{flag(name)} {message}")
    if config.data_dir is not None and not Path(config.data_dir).is_dir():
        raise UsageError(f"--data-dir {config.data_dir}: not a directory; point it at the folder holding "
                         f"the four IDX files")
    if config.resume == "auto" and config.output_dir is None:
        raise UsageError("--resume auto needs --output-dir: the run directory to continue (or start)")
    if config.resume not in (None, "auto") and not Path(config.resume).is_dir():
        raise UsageError(f"--resume {config.resume}: not a directory; pass 'auto' or a checkpoint directory")
    if config.output_dir is not None and config.resume is None:
        output = Path(config.output_dir)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise UsageError(f"--output-dir {output} already exists and is not empty; choose a new "
                             f"directory so no earlier run is overwritten, or pass --resume auto to continue it")
