"""The one training configuration: a dataclass whose fields become the command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import types
import typing
from pathlib import Path

import yaml

from vgg_dist.cli import FlagParser, check_positive, flag
from vgg_dist.data import DATASETS
from vgg_dist.errors import UsageError
from vgg_dist.model import ARCHITECTURES, ModelSpec
from vgg_dist.optim import SCHEDULES
from vgg_dist.run_files import TRAIN_CONFIG_NAME

MAX_SEED = 2 ** 32 - 1           # NumPy's seeds are 32-bit
MAX_DIST_TIMEOUT = 7 * 24 * 3600  # a week: beyond it a collective is not waiting, it is lost
MAX_CROP_PADDING = 16
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MAX_LR = 3.4028234663852886e38   # the optimizer multiplies float32 gradients by it
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def _field(default, help: str, **metadata):
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass
class TrainConfig:
    """Defaults reproduce d2l's VGG chapter: VGG-11, channels / 4, 224x224, SGD lr 0.05, batch 128, 10 epochs.

    Everything beyond the chapter is off by default; named recipes (--recipe) switch it on.
    """

    recipe: str = _field("chapter", "a named set of flag values; any flag given as well overrides the recipe's "
                                    "value (see 'recipes' below)")
    # Data
    data_dir: str | None = _field(None, "directory holding Zalando's four IDX files "
                                        "(default: load from the Hugging Face Hub)")
    dataset: str = _field("fashion_mnist", "which dataset", choices=tuple(DATASETS))
    max_train_samples: int | None = _field(None, "use only the first N training images (quick runs)")
    max_eval_samples: int | None = _field(None, "use only the first N test images (quick runs)")
    val_split: float = _field(0.0, "hold out this fraction of the training images (the last ones) as a "
                                   "validation set, evaluated every epoch beside the test set; tune on it")
    # Model
    # Listed in --help but checked by the model, whose message says what to choose.
    arch: str = _field(ModelSpec.arch, "VGG depth", metavar="{" + ",".join(ARCHITECTURES) + "}")
    width_divisor: int = _field(ModelSpec.width_divisor, "divide every conv's channel count by this "
                                                         "(the chapter's ratio)")
    batch_norm: bool = _field(ModelSpec.batch_norm, "BatchNorm after every conv")
    sync_bn: bool = _field(True, "with --batch-norm on several processes, compute BatchNorm statistics over "
                                 "the global batch, so 1 and N processes take the same steps")
    hidden_size: int = _field(ModelSpec.hidden_size, "width of the two hidden fully connected layers")
    dropout: float = _field(ModelSpec.dropout, "dropout probability in the classifier "
                                               "(masks are drawn per process)")
    image_size: int = _field(ModelSpec.image_size, "resize images to this side, a multiple of 32")
    # Optimisation
    epochs: int = _field(10, "passes over the training set")
    batch_size: int = _field(128, "GLOBAL batch size, split evenly across processes, so 1 and N "
                                  "processes take the same optimizer steps")
    lr: float = _field(0.05, "SGD learning rate (the peak of a schedule)")
    lr_schedule: str = _field("constant", "learning rate over the run, set every step", choices=SCHEDULES)
    warmup_epochs: float = _field(0.0, "rise linearly from 0 to --lr over this many epochs first")
    momentum: float = _field(0.0, "SGD momentum (the chapter uses none)")
    nesterov: bool = _field(False, "Nesterov momentum (needs --momentum)")
    weight_decay: float = _field(0.0, "L2 weight decay on weights; never on biases or BatchNorm")
    label_smoothing: float = _field(0.0, "cross-entropy label smoothing")
    clip_grad_norm: float | None = _field(None, "clip the gradients' global norm to this")
    seed: int = _field(0, "seed for weights, data order, augmentation and dropout")
    # Augmentation, on the device, seeded by seed/epoch/step
    random_crop_padding: int = _field(0, "random translation: pad the 28x28 image by this many pixels, "
                                         "crop 28x28 at random")
    hflip: float = _field(0.0, "probability of a horizontal flip")
    random_erase: float = _field(0.0, "probability of erasing a random rectangle (random erasing)")
    # Evaluation
    model_ema: bool = _field(False, "keep an exponential moving average of the weights; evaluate and save it")
    model_ema_decay: float = _field(0.999, "decay of --model-ema per step")
    tta: bool = _field(False, "test-time augmentation: average the predictions on each image and its mirror")
    # Speed
    compile: bool | None = _field(None, "torch.compile the model, training and evaluation (default: on with a GPU, "
                                        "where it measured 1.4x faster per epoch, off on a CPU, where it "
                                        "measured 10% slower; see BENCHMARKS.md)")
    compile_mode: str = _field("default", "torch.compile's mode; reduce-overhead replays the compiled steps as "
                                          "CUDA graphs", choices=COMPILE_MODES)
    cuda_graphs: bool = _field(False, "record each training step's GPU work once as a CUDA graph and replay it "
                                      "(one GPU, one process, bf16 or fp32): for small models that launch "
                                      "more kernels than they compute")
    fused_pool: bool = _field(False, "write each 2x2 max-pool as a reshape and a max, which torch.compile fuses "
                                     "with the ReLU before it (same outputs as nn.MaxPool2d)")
    channels_last: bool = _field(True, "NHWC activations: cuDNN's tensor-core kernels want them, and on "
                                       "the CPU oneDNN ran this model 1.5x faster with them (BENCHMARKS.md)")
    ddp_bf16_grads: bool = _field(False, "all-reduce gradients in bf16 (DDP comm hook): half the traffic, "
                                         "for multi-node runs on slow networks")
    # Output
    output_dir: str | None = _field(None, "run directory; must be new or empty unless resuming its own run "
                                          "(default: runs/<timestamp>)")
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


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_summary(name: str) -> str:
    """A recipe file's first line, which says what it is for (`# fast: ...`)."""
    first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0]
    return first.removeprefix("#").strip()


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = FlagParser(prog=prog, description=description,
                        epilog="recipes: " + "; ".join(recipe_summary(name) for name in recipe_names()))
    for field in dataclasses.fields(TrainConfig):
        kind = _base_type(field.name)
        options = {"default": field.default, "help": field.metadata["help"]}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif field.name == "recipe":
            options["choices"] = recipe_names()
        elif "choices" in field.metadata:
            options["choices"] = field.metadata["choices"]
        else:
            options["type"] = kind
            options["metavar"] = field.metadata.get("metavar", field.name.upper())
        parser.add_argument(flag(field.name), **options)
    parser.add_argument("--config", metavar="FILE", help="YAML file of flag values; it overrides the recipe, "
                                                         f"flags given here override both; every run writes one "
                                                         f"as {TRAIN_CONFIG_NAME}")
    return parser


# Where a run is written and how it starts are not part of the recipe a config file reproduces.
NOT_IN_CONFIG_FILES = ("output_dir", "resume")


def parse_config(argv: list[str] | None, prog: str, description: str) -> TrainConfig:
    """Parse and validate flags; any problem is a UsageError naming the flag.

    Each value comes from the first of: the command line, `--config FILE`, the recipe (`--recipe`, or
    the config file's `recipe`, or the chapter's), the defaults.
    """
    given = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    given.add_argument("--config")
    given.add_argument("--recipe")
    known, _ = given.parse_known_args(argv)
    from_file = read_config_file(Path(known.config), "--config") if known.config is not None else {}
    recipe = known.recipe or from_file.get("recipe") or TrainConfig.recipe
    if recipe not in recipe_names():
        named_by = "--recipe" if known.recipe else f"--config {known.config}: recipe"
        raise UsageError(f"{named_by} {recipe!r} is unknown; choose one of {', '.join(recipe_names())}")
    parser = build_parser(prog, description)
    parser.set_defaults(**{**read_config_file(RECIPES_DIR / f"{recipe}.yaml", "--recipe"), **from_file,
                           "recipe": recipe})
    namespace = vars(parser.parse_args(argv))
    namespace.pop("config")
    config = TrainConfig(**namespace)
    validate(config)
    return config


def read_config_file(path: Path, source: str) -> dict:
    """Flag values from a YAML mapping, keys spelled as flags (`batch-size`) or fields (`batch_size`);
    `source` is the flag that named the file, for messages."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{source} {path}: file not found") from None
    except UnicodeDecodeError:
        raise UsageError(f"{source} {path}: not UTF-8 text; save it as UTF-8 YAML") from None
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"{source} {path}: not readable YAML ({str(error).splitlines()[0]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"{source} {path}: must be a mapping of flag names to values")
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    defaults = {}
    for key, value in values.items():
        name = str(key).removeprefix("--").replace("-", "_")
        if name in NOT_IN_CONFIG_FILES:
            raise UsageError(f"{source} {path}: {key} is not part of a recipe; pass {flag(name)} on the command line")
        if name not in fields:
            raise UsageError(f"{source} {path}: unknown setting {key!r}; use flag names such as batch_size")
        kind = _base_type(name)
        optional = type(None) in typing.get_args(typing.get_type_hints(TrainConfig)[name])
        allowed = (int, float) if kind is float else (kind,)
        if value is None and not optional:
            raise UsageError(f"{source} {path}: {key} needs a value ({kind.__name__}), not null")
        if value is not None and (not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool))):
            raise UsageError(f"{source} {path}: {key} must be {kind.__name__}, got {value!r}")
        defaults[name] = value
    return defaults


def config_file_values(config: TrainConfig) -> dict:
    """What `--config` needs to reproduce this run's recipe."""
    return {name: value for name, value in config.to_dict().items() if name not in NOT_IN_CONFIG_FILES}


def _check_range(name: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    inside = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not inside:
        raise UsageError(f"{flag(name)} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


def validate(config: TrainConfig) -> None:
    """Every check that needs neither the data nor the process group."""
    for name in ("epochs", "batch_size", "image_size", "width_divisor", "hidden_size", "max_train_samples",
                 "max_eval_samples", "sync_every", "dist_timeout"):
        check_positive(name, getattr(config, name))
    for name in ("checkpoint_every", "keep_last", "random_crop_padding"):
        if getattr(config, name) < 0:
            raise UsageError(f"{flag(name)} must be 0 or more, got {getattr(config, name)}")
    _check_range("seed", config.seed, 0, MAX_SEED)
    _check_range("dist_timeout", config.dist_timeout, 1, MAX_DIST_TIMEOUT)
    _check_range("random_crop_padding", config.random_crop_padding, 0, MAX_CROP_PADDING)
    if not 0 < config.lr <= MAX_LR:
        raise UsageError(f"--lr must be a positive number no larger than {MAX_LR:.3g} (float32's largest), "
                         f"got {config.lr}")
    _check_range("momentum", config.momentum, 0, 1, high_open=True)
    if config.nesterov and config.momentum == 0:
        raise UsageError("--nesterov needs a --momentum above 0 (e.g. --momentum 0.9)")
    _check_range("weight_decay", config.weight_decay, 0, 1)
    _check_range("label_smoothing", config.label_smoothing, 0, 1, high_open=True)
    _check_range("val_split", config.val_split, 0, 1, high_open=True)
    _check_range("hflip", config.hflip, 0, 1)
    _check_range("random_erase", config.random_erase, 0, 1)
    _check_range("model_ema_decay", config.model_ema_decay, 0, 1, high_open=True)
    if config.clip_grad_norm is not None and not (math.isfinite(config.clip_grad_norm) and config.clip_grad_norm > 0):
        raise UsageError(f"--clip-grad-norm must be a positive number, got {config.clip_grad_norm}")
    if not (math.isfinite(config.warmup_epochs) and 0 <= config.warmup_epochs <= config.epochs):
        raise UsageError(f"--warmup-epochs {config.warmup_epochs} must be between 0 and --epochs "
                         f"{config.epochs}: the warm-up cannot be longer than the run")
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
    if config.output_dir is not None:
        check_writable_dir("output_dir", Path(config.output_dir))
    if config.output_dir is not None and config.resume is None:
        output = Path(config.output_dir)
        if output.is_dir() and any(output.iterdir()):
            raise UsageError(f"--output-dir {output} already exists and is not empty; choose a new "
                             f"directory so no earlier run is overwritten, or pass --resume auto to continue it")


def check_writable_dir(name: str, path: Path) -> None:
    """`path` is, or can be created as, a directory this process may write into; checked before any work,
    so a bad path costs nothing."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop is RuntimeError before Python 3.13
        raise UsageError(f"{flag(name)} {path}: cannot be resolved ({error})") from None
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag(name)} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag(name)} {path}: {existing} is not writable by this user")
