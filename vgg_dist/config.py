"""The one training configuration: a dataclass whose fields become the command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import types
import typing
from pathlib import Path

from vgg_dist.cli import FlagParser, check_positive, flag
from vgg_dist.data import DATASETS
from vgg_dist.errors import UsageError
from vgg_dist.model import ARCHITECTURES, ModelSpec
from vgg_dist.run_files import TRAIN_CONFIG_NAME


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
    # Listed in --help but checked by the model, whose message says what to choose.
    arch: str = _field(ModelSpec.arch, "VGG depth", metavar="{" + ",".join(ARCHITECTURES) + "}")
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
    # Speed
    compile: bool = _field(False, "torch.compile the model (compiles once for training, once for evaluation)")
    channels_last: bool = _field(True, "NHWC activations: cuDNN's tensor-core kernels want them, and on "
                                       "the CPU oneDNN ran this model 1.5x faster with them (BENCHMARKS.md)")
    # Output
    output_dir: str | None = _field(None, "run directory; must not already hold files unless resuming "
                                          "(default: runs/<timestamp>)")
    ddp_bf16_grads: bool = _field(False, "all-reduce gradients in bf16 (DDP comm hook): half the traffic, "
                                         "for multi-node runs on slow networks")
    # What you see
    progress: bool | None = _field(None, "progress bar per epoch (default: on when stdout is a terminal)")
    report_to: str = _field("none", "experiment trackers, through Accelerate", choices=("none", "tensorboard",
                                                                                      "wandb", "all"))
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


def _base_type(annotation: str):
    """int from 'int | None', and so on: the type argparse should convert a flag's text to."""
    resolved = typing.get_type_hints(TrainConfig)[annotation]
    if isinstance(resolved, types.UnionType):
        resolved = next(arg for arg in typing.get_args(resolved) if arg is not type(None))
    return resolved


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    # No abbreviations: `--epoch 3` in a saved command must not silently mean `--epochs 3`.
    parser = FlagParser(prog=prog, description=description)
    for field in dataclasses.fields(TrainConfig):
        kind = _base_type(field.name)
        options = {"default": field.default, "help": field.metadata["help"]}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif "choices" in field.metadata:
            options["choices"] = field.metadata["choices"]
        else:
            options["type"] = kind
            options["metavar"] = field.metadata.get("metavar", field.name.upper())
        parser.add_argument(flag(field.name), **options)
    return parser


# Where a run is written and how it starts are not part of the recipe a config file reproduces.
NOT_IN_CONFIG_FILES = ("output_dir", "resume")


def parse_config(argv: list[str] | None, prog: str, description: str) -> TrainConfig:
    """Parse and validate flags; any problem is a UsageError naming the flag.

    `--config FILE` (YAML) supplies defaults for any flag; flags on the command line still win.
    """
    parser = build_parser(prog, description)
    parser.add_argument("--config", metavar="FILE", help="YAML file of flag values (flags given here win); "
                                                         f"every run writes one as {TRAIN_CONFIG_NAME}")
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**read_config_file(Path(known.config)))
    namespace = vars(parser.parse_args(argv))
    namespace.pop("config")
    config = TrainConfig(**namespace)
    validate(config)
    return config


def read_config_file(path: Path) -> dict:
    """Flag values from a YAML mapping, keys spelled as flags (`batch-size`) or fields (`batch_size`)."""
    import yaml
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: file not found") from None
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"--config {path}: not readable YAML ({str(error).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: must be a mapping of flag names to values")
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    defaults = {}
    for key, value in values.items():
        name = str(key).removeprefix("--").replace("-", "_")
        if name in NOT_IN_CONFIG_FILES:
            raise UsageError(f"--config {path}: {key} is not part of a recipe; pass {flag(name)} on the command line")
        if name not in fields:
            raise UsageError(f"--config {path}: unknown setting {key!r}; use flag names such as batch_size")
        kind = _base_type(name)
        allowed = (int, float) if kind is float else (kind,)
        if value is not None and (not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool))):
            raise UsageError(f"--config {path}: {key} must be {kind.__name__}, got {value!r}")
        defaults[name] = value
    return defaults


def config_file_values(config: TrainConfig) -> dict:
    """What `--config` needs to reproduce this run's recipe."""
    return {name: value for name, value in config.to_dict().items() if name not in NOT_IN_CONFIG_FILES}


def validate(config: TrainConfig) -> None:
    """Every check that needs neither the data nor the process group."""
    positive = ["epochs", "batch_size", "image_size", "width_divisor", "hidden_size",
                "max_train_samples", "max_eval_samples", "sync_every", "dist_timeout"]
    for name in positive:
        check_positive(name, getattr(config, name))
    for name in ("checkpoint_every", "keep_last"):
        if getattr(config, name) < 0:
            raise UsageError(f"{flag(name)} must be 0 or more, got {getattr(config, name)}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {config.lr}")
    if not 0.0 <= config.momentum < 1.0:
        raise UsageError(f"--momentum must be in [0, 1), got {config.momentum}")
    # Shape problems (architecture, image size, divisor, dropout) are the model's to state.
    config.model_spec(in_channels=1, num_classes=10).check()
    if config.data_dir is not None and not Path(config.data_dir).is_dir():
        raise UsageError(f"--data-dir {config.data_dir}: not a directory; point it at the folder holding "
                         f"the four IDX files")
    if config.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise UsageError(f"--report-to {config.report_to} needs the wandb package: pip install wandb")
    if config.report_to in ("tensorboard", "all") and importlib.util.find_spec("tensorboard") is None:
        raise UsageError(f"--report-to {config.report_to} needs the tensorboard package: pip install tensorboard")
    if config.resume == "auto" and config.output_dir is None:
        raise UsageError("--resume auto needs --output-dir: the run directory to continue (or start)")
    if config.resume not in (None, "auto") and not Path(config.resume).is_dir():
        raise UsageError(f"--resume {config.resume}: not a directory; pass 'auto' or a checkpoint directory")
    if config.output_dir is not None and config.resume is None:
        output = Path(config.output_dir)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise UsageError(f"--output-dir {output} already exists and is not empty; choose a new "
                             f"directory so no earlier run is overwritten, or pass --resume auto to continue it")
