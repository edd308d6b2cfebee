"""The one training configuration: a dataclass whose fields become the command-line flags, grouped as
`--help` shows them, filled from a recipe, a `--config` file and the command line, then validated."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from vgg_dist.cli import FlagParser, check_positive, flag
from vgg_dist.data.auto_augment import parse_policy
from vgg_dist.data.sources import DATASETS, check_dataset_name
from vgg_dist.errors import UsageError
from vgg_dist.fields import FieldError, checked_fields, short
from vgg_dist.model import ARCHITECTURES, ModelSpec
from vgg_dist.pretrained import TORCHVISION, check_pretrainable
from vgg_dist.training.optim import OPTIMIZERS, SCHEDULES

TRAIN_CONFIG_NAME = "train_config.yaml"  # what every run writes: --config THIS_FILE reproduces its recipe
MAX_SEED = 2 ** 32 - 1           # NumPy's seeds are 32-bit
MAX_DIST_TIMEOUT = 7 * 24 * 3600  # a week: beyond it a collective is not waiting, it is lost
MAX_CROP_PADDING = 16
MAX_DATA_SIZE = 4096             # the stored side predict also accepts (run_files.MAX_SOURCE_SIDE)
MAX_CONFIG_BYTES = 1 << 20       # a recipe is a few hundred bytes; a megabyte is not a recipe
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
NORMALIZATIONS = ("none", "dataset", "imagenet")
MAX_LR = 3.4028234663852886e38   # the optimizer multiplies float32 gradients by it
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
# --help shows the flags in these groups, in this order.
GROUPS = ("recipe", "data", "model", "optimisation", "augmentation", "evaluation", "distributed", "checkpoints", "output",
          "speed")


def _field(default, group: str, help: str, **metadata):
    return dataclasses.field(default=default, metadata={"group": group, "help": help, **metadata})


@dataclasses.dataclass
class TrainConfig:
    """Defaults reproduce d2l's VGG chapter: VGG-11, channels / 4, 224x224, SGD lr 0.05, batch 128, 10 epochs.

    Everything beyond the chapter is off by default; named recipes (--recipe) switch it on.
    """

    recipe: str = _field("chapter", "recipe", "a named set of flag values; any flag given as well "
                                                    "overrides the recipe's value (see 'recipes' below)")
    data_dir: str | None = _field(None, "data", "directory of images: Zalando's four IDX files, an ImageFolder tree "
                                                "(train/CLASS/*, test/CLASS/* or val/CLASS/*), a `datasets` "
                                                "save_to_disk folder, or Hub-style parquet files "
                                                "(data/train-*.parquet, data/test-*.parquet) (default: load from "
                                                "the Hugging Face Hub)")
    dataset: str = _field("fashion_mnist", "data", f"{', '.join(DATASETS)}, or any Hub image-classification "
                                                   f"dataset as OWNER/NAME (its image and class-label columns are "
                                                   f"found from its features); downloaded through `datasets` "
                                                   f"unless --data-dir holds it", metavar="NAME")
    train_split: str = _field("train", "data", "the split to train on (Hub datasets, save_to_disk and parquet "
                                               "folders, ImageFolder trees)")
    test_split: str | None = _field(None, "data", "the split to test on (default: test, else validation; val in an "
                                                  "ImageFolder tree)")
    class_names: str | None = _field(None, "data", "text file with one class name per line, for IDX data that "
                                                   "is neither Fashion-MNIST nor MNIST")
    image_column: str | None = _field(None, "data", "with save_to_disk or parquet data: the Image column to use "
                                                    "(default: the only one)")
    label_column: str | None = _field(None, "data", "with save_to_disk or parquet data: the ClassLabel column to use "
                                                    "(default: the only one)")
    channels: int | None = _field(None, "data", "store images with 1 (grey) or 3 (RGB) channels (default: 1 when "
                                                "every training image is grey, else 3)")
    data_size: int | None = _field(None, "data", "store images at this side, shorter side resized then centre-"
                                                 "cropped, once (default: their own size when all training images "
                                                 "share one square size, else --image-size)")
    decode_workers: int | None = _field(None, "data", "processes that decode a folder into the cache (default: "
                                                      "one per core)")
    cache_dir: str | None = _field(None, "data", "where decoded images are cached (default: "
                                                 "$XDG_CACHE_HOME/vgg_dist/datasets)")
    skip_bad_images: bool = _field(False, "data", "leave out images that cannot be decoded, instead of refusing "
                                                  "the run; config.json records how many and which")
    normalize: str = _field("none", "data", "standardise the input per channel: none leaves it in [0, 1] (the "
                                            "chapter); dataset uses the training images' mean and std; imagenet "
                                            "uses ImageNet's (the default with --pretrained); config.json "
                                            "records the values", choices=NORMALIZATIONS)
    max_train_samples: int | None = _field(None, "data", "use only the first N training images (quick runs)")
    max_eval_samples: int | None = _field(None, "data", "use only the first N test images (quick runs)")
    val_split: float = _field(0.0, "data", "hold out this fraction of the training images (the last ones) as a "
                                           "validation set, evaluated every epoch beside the test set; tune on it")
    # Listed in --help but checked by the model, whose message says what to choose.
    arch: str = _field(ModelSpec.arch, "model", "VGG depth", metavar="{" + ",".join(ARCHITECTURES) + "}")
    width_divisor: int = _field(ModelSpec.width_divisor, "model", "divide every conv's channel count by this "
                                                                  "(the chapter's ratio)")
    batch_norm: bool = _field(ModelSpec.batch_norm, "model", "BatchNorm after every conv")
    hidden_size: int = _field(ModelSpec.hidden_size, "model", "width of the two hidden fully connected layers")
    dropout: float = _field(ModelSpec.dropout, "model", "dropout probability in the classifier (masks are drawn "
                                                        "per process)")
    image_size: int = _field(ModelSpec.image_size, "model", "resize images to this side, a multiple of 32")
    pretrained: str | None = _field(None, "model", "start from torchvision's ImageNet weights for --arch (and "
                                                   "--batch-norm): alone, through torchvision's weights API into "
                                                   "$TORCH_HOME; or PATH, a torchvision state dict (.pth or "
                                                   ".safetensors). Needs --width-divisor 1 and --hidden-size 4096; "
                                                   "the last layer starts fresh (docs/pretrained.md)",
                                    const=TORCHVISION, metavar="PATH")
    freeze_features: bool = _field(False, "model", "train only the classifier: the convolutions' weights are left "
                                                   "out of the optimizer and their BatchNorm layers stay in eval "
                                                   "mode, so their running statistics do not change either")
    feature_lr_scale: float = _field(1.0, "optimisation", "the convolutions learn at F times the learning rate "
                                                          "(the classifier at --lr): their own parameter groups, "
                                                          "following the same schedule", metavar="F")
    epochs: int = _field(10, "optimisation", "passes over the training set")
    batch_size: int = _field(128, "optimisation", "GLOBAL batch size, split evenly across processes, so 1 and N "
                                                  "processes take the same optimizer steps")
    grad_accum_steps: int = _field(1, "optimisation", "split each process's share of the global batch into K "
                                                      "micro-batches and step once after all K (gradient "
                                                      "accumulation); --batch-size must divide by processes x K; "
                                                      "BatchNorm statistics are per micro-batch", metavar="K")
    optimizer: str = _field("sgd", "optimisation", "sgd (with --momentum, --nesterov) or adamw (with --beta1, "
                                                   "--beta2; decoupled weight decay)", choices=OPTIMIZERS)
    lr: float = _field(0.05, "optimisation", "learning rate (the peak of a schedule)")
    lr_schedule: str = _field("constant", "optimisation", "learning rate over the run, set every step; onecycle "
                                                          "falls linearly to 0 after the warm-up", choices=SCHEDULES)
    warmup_epochs: float = _field(0.0, "optimisation", "rise linearly from 0 to --lr over this many epochs first "
                                                       "(a recipe's warm-up shrinks and grows with --epochs)")
    momentum: float = _field(0.0, "optimisation", "SGD momentum (the chapter uses none); unused by adamw")
    nesterov: bool = _field(False, "optimisation", "Nesterov momentum (needs --momentum); unused by adamw")
    beta1: float = _field(0.9, "optimisation", "adamw's decay of the gradient's running mean; unused by sgd")
    beta2: float = _field(0.999, "optimisation", "adamw's decay of the squared gradient's running mean; unused "
                                                 "by sgd")
    weight_decay: float = _field(0.0, "optimisation", "weight decay on weights, never on biases or BatchNorm: an "
                                                      "L2 term with sgd, decoupled (weights x (1 - lr x decay) each "
                                                      "step) with adamw")
    label_smoothing: float = _field(0.0, "optimisation", "cross-entropy label smoothing")
    clip_grad_norm: float | None = _field(None, "optimisation", "clip the gradients' global norm to this")
    seed: int = _field(0, "optimisation", "seed for weights, data order, augmentation and dropout")
    random_crop_padding: int = _field(0, "augmentation", "random translation: pad each image by this many pixels, "
                                                         "crop it back at random (on the device)")
    hflip: float = _field(0.0, "augmentation", "probability of a horizontal flip")
    random_erase: float = _field(0.0, "augmentation", "probability of erasing a random rectangle")
    auto_augment: str | None = _field(None, "augmentation", "RandAugment (rand-mM-nN: N operations per image at "
                                                            "magnitude M of 0..30, e.g. rand-m9-n2) or TrivialAugment "
                                                            "(trivial: one operation, magnitude drawn per image), as "
                                                            "torchvision defines them, per image on the device after "
                                                            "crop and flip; none: off", metavar="POLICY",
                                      aliases=("--aa",))
    mixup: float = _field(0.0, "augmentation", "MixUp: blend each image with a partner from the global batch, "
                                               "weight ~ Beta(ALPHA, ALPHA) per step, soft targets (0: off); "
                                               "train accuracy then counts the dominant label (weighted >= 0.5) "
                                               "and train loss is the mixed loss", metavar="ALPHA")
    cutmix: float = _field(0.0, "augmentation", "CutMix: paste a box of a partner image, its area ~ Beta(ALPHA, "
                                                "ALPHA) per step, soft targets (0: off); train accuracy as with "
                                                "--mixup", metavar="ALPHA")
    mix_prob: float = _field(1.0, "augmentation", "probability that a step is mixed (with --mixup or --cutmix)")
    mix_switch_prob: float = _field(0.5, "augmentation", "with both --mixup and --cutmix, probability that a mixed "
                                                         "step uses CutMix")
    model_ema: bool = _field(False, "evaluation", "keep an exponential moving average (EMA) of the weights; "
                                                  "evaluate and save it")
    model_ema_decay: float = _field(0.999, "evaluation", "decay of --model-ema per step")
    tta: bool = _field(False, "evaluation", "test-time augmentation (TTA): average the predictions on each image "
                                            "and its mirror")
    sync_bn: bool = _field(True, "distributed", "with --batch-norm on several processes, compute BatchNorm "
                                                "statistics over the global batch, so 1 and N processes take the "
                                                "same steps")
    ddp_bf16_grads: bool = _field(False, "distributed", "all-reduce gradients in bf16: half the traffic, for "
                                                        "multi-node runs on slow networks")
    dist_timeout: int = _field(600, "distributed", "seconds a collective may wait for the other processes before "
                                                   "the job fails (a dead rank ends the job instead of hanging)")
    sync_every: int = _field(10, "distributed", "every N steps, all processes agree on stop signals and "
                                                "non-finite losses (one small collective)")
    checkpoint_every: int = _field(0, "checkpoints", "also checkpoint every N optimizer steps (0: only at epoch "
                                                     "ends)")
    checkpoint_epochs: bool = _field(True, "checkpoints", "checkpoint at the end of every epoch")
    keep_last: int = _field(2, "checkpoints", "keep the newest K checkpoints (0: keep all); the best is always "
                                              "kept")
    resume: str | None = _field(None, "checkpoints", "'auto': continue the run in --output-dir from its newest "
                                                     "complete checkpoint, or start it; or a checkpoint directory")
    requeue: bool = _field(False, "checkpoints", "after a stop signal under SLURM, run `scontrol requeue "
                                                 "$SLURM_JOB_ID`")
    output_dir: str | None = _field(None, "output", "run directory; must be new or empty unless resuming its own "
                                                    "run (default: runs/<timestamp>)")
    progress: bool | None = _field(None, "output", "progress bar per epoch (default: on when stdout is a terminal)")
    report_to: str = _field("none", "output", "experiment trackers, through Accelerate",
                            choices=("none", "tensorboard", "wandb", "all"))
    compile: bool | None = _field(None, "speed", "torch.compile the model, training and evaluation (default: on "
                                                 "with a GPU, off on a CPU; see docs/performance.md)")
    compile_mode: str = _field("default", "speed", "torch.compile's mode; reduce-overhead replays the compiled "
                                                   "steps as CUDA graphs", choices=COMPILE_MODES)
    cuda_graphs: bool = _field(False, "speed", "record each training step's GPU work once as a CUDA graph and "
                                               "replay it (one GPU, one process, bf16 or fp32)")
    fused_pool: bool = _field(False, "speed", "write each 2x2 max-pool as a reshape and a max, which "
                                              "torch.compile fuses with the ReLU before it")
    channels_last: bool = _field(True, "speed", "channels-last (NHWC) activations, the layout fast convolution "
                                                "kernels want")

    def model_spec(self, in_channels: int, num_classes: int,
                   statistics: tuple[list[float], list[float]] | None = None) -> ModelSpec:
        """The model for data of `in_channels` and `num_classes`, standardised with `statistics` (mean, std)."""
        mean, std = statistics or (None, None)
        return ModelSpec(arch=self.arch, width_divisor=self.width_divisor, batch_norm=self.batch_norm,
                         in_channels=in_channels, num_classes=num_classes, image_size=self.image_size,
                         hidden_size=self.hidden_size, dropout=self.dropout, input_mean=mean, input_std=std)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _base_type(name: str):
    """int from 'int | None', and so on: the type argparse should convert a flag's text to."""
    resolved = typing.get_type_hints(TrainConfig)[name]
    if isinstance(resolved, types.UnionType):
        resolved = next(arg for arg in typing.get_args(resolved) if arg is not type(None))
    return resolved


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_summary(name: str) -> str:
    """A recipe file's first line, which says what it is for (`# fast: ...`)."""
    return (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0].removeprefix("#").strip()


def build_parser(prog: str, description: str, with_defaults: bool = True) -> argparse.ArgumentParser:
    """The flags, in GROUPS; without defaults, parsing yields only the flags actually given."""
    parser = FlagParser(prog=prog, description=description,
                        epilog="recipes: " + "; ".join(recipe_summary(name) for name in recipe_names()),
                        **({} if with_defaults else {"argument_default": argparse.SUPPRESS}))
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for field in dataclasses.fields(TrainConfig):
        kind = _base_type(field.name)
        options = {"help": field.metadata["help"], **({"default": field.default} if with_defaults else {})}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif field.name == "recipe":  # checked by parse_config, whose message names the recipe files
            options["metavar"] = "{" + ",".join(recipe_names()) + "}"
        elif "choices" in field.metadata:
            options["choices"] = field.metadata["choices"]
        else:
            options.update(type=kind, metavar=field.metadata.get("metavar", field.name.upper()))
            if "const" in field.metadata:  # the flag alone means this value: --pretrained, --pretrained PATH
                options.update(nargs="?", const=field.metadata["const"])
        aliases = field.metadata.get("aliases", ())
        groups[field.metadata["group"]].add_argument(flag(field.name), *aliases, **options)
    groups["recipe"].add_argument(
        "--config", metavar="FILE", help=f"YAML file of flag values; it overrides the recipe, flags given here "
                                         f"override both; every run writes one as {TRAIN_CONFIG_NAME}")
    return parser


# Where a run is written and how it starts are not part of the recipe a config file reproduces.
NOT_IN_CONFIG_FILES = ("output_dir", "resume")


def parse_config(argv: list[str] | None, prog: str, description: str) -> TrainConfig:
    """Parse and validate flags; any problem is a UsageError naming the flag.

    Each value comes from the first of: the command line, `--config FILE`, the recipe (`--recipe`, or
    the config file's `recipe`, or the chapter's), the defaults. A recipe's warm-up is a share of its
    length: shortening or lengthening the recipe with --epochs scales it, unless --warmup-epochs is given.
    """
    # Which flags were given, to layer them over a config file and a recipe. --help is left to the second
    # parser, whose defaults are the recipe's: that is what the help should show.
    flags_only = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg not in ("-h", "--help")]
    given = vars(build_parser(prog, description, with_defaults=False).parse_args(flags_only))
    from_file = read_config_file(Path(given["config"]), "--config") if "config" in given else {}
    recipe = given.get("recipe") or from_file.get("recipe") or TrainConfig.recipe
    if recipe not in recipe_names():
        named_by = "--recipe" if "recipe" in given else f"--config {given['config']}: recipe"
        raise UsageError(f"{named_by} {recipe!r} is unknown; choose one of {', '.join(recipe_names())}")
    from_recipe = read_config_file(RECIPES_DIR / f"{recipe}.yaml", "--recipe")
    chosen = {**from_file, **given}
    if "epochs" in chosen and "warmup_epochs" not in chosen and from_recipe.get("warmup_epochs"):
        from_recipe["warmup_epochs"] *= chosen["epochs"] / from_recipe["epochs"]
    parser = build_parser(prog, description)
    if "pretrained" in chosen and "normalize" not in chosen:
        from_recipe["normalize"] = "imagenet"  # ImageNet weights expect ImageNet's standardised input
    parser.set_defaults(**{**from_recipe, **from_file, "recipe": recipe})
    namespace = vars(parser.parse_args(argv))
    namespace.pop("config")
    if namespace.get("data_dir"):  # evaluate, predict and export read the run from any working directory
        namespace["data_dir"] = os.path.abspath(namespace["data_dir"])
    config = TrainConfig(**namespace)
    validate(config)
    return config


class _StrictLoader(yaml.SafeLoader):
    """YAML without aliases (a few hundred bytes of them expand to gigabytes) or repeated keys (silently
    last-wins otherwise)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError(f"aliases (*name) are not allowed, line {self.peek_event().start_mark.line + 1}")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=True) for key, _ in node.value]
        repeated = next((key for index, key in enumerate(keys) if key in keys[:index]), None)
        if repeated is not None:
            raise yaml.YAMLError(f"{str(repeated)[:40]!r} is given twice")
        return super().construct_mapping(node, deep)


def read_config_file(path: Path, source: str) -> dict:
    """Flag values from a YAML mapping, keys spelled as flags (`batch-size`) or fields (`batch_size`);
    `source` is the flag that named the file, for messages."""
    try:
        if not path.is_file():
            raise UsageError(f"{source} {path}: {'file not found' if not path.exists() else 'not a regular file'}")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UsageError(f"{source} {path}: {path.stat().st_size:,} bytes is too large for a config file")
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except UnicodeDecodeError:
        raise UsageError(f"{source} {path}: not UTF-8 text; save it as UTF-8 YAML") from None
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"{source} {path}: not readable YAML ({str(error).splitlines()[0][:200]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"{source} {path}: must be a mapping of flag names to values")
    names = {}
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    for key in values:
        name = str(key).removeprefix("--").replace("-", "_")
        if name in NOT_IN_CONFIG_FILES:
            raise UsageError(f"{source} {path}: {key} is not part of a recipe; pass {flag(name)} on the command line")
        if name not in known:
            raise UsageError(f"{source} {path}: unknown setting {short(key)}; use flag names such as batch_size")
        names[name] = values[key]
    try:
        return checked_fields(TrainConfig, names, "")
    except FieldError as error:
        raise UsageError(f"{source} {path}: {error}") from None


def config_file_values(config: TrainConfig) -> dict:
    """What `--config` needs to reproduce this run's recipe."""
    return {name: value for name, value in config.to_dict().items() if name not in NOT_IN_CONFIG_FILES}


def _check_range(name: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    inside = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not inside:
        raise UsageError(f"{flag(name)} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


def validate(config: TrainConfig) -> None:
    """Every check that needs neither the data nor the process group."""
    _validate_numbers(config)
    parse_policy(config.auto_augment)
    check_dataset_name(config.dataset)
    for name in ("train_split", "test_split"):
        if getattr(config, name) is not None and not getattr(config, name).strip():
            raise UsageError(f"{flag(name)} needs a split's name, such as train or test")
    # Shape problems (architecture, image size, divisor, dropout) are the model's to state.
    config.model_spec(in_channels=1, num_classes=10).check()
    _validate_paths(config)
    if config.pretrained is not None:  # the data's channels are checked once it is loaded
        check_pretrainable(config.model_spec(in_channels=1, num_classes=10))
        if config.pretrained != TORCHVISION and not Path(config.pretrained).is_file():
            raise UsageError(f"--pretrained {config.pretrained}: file not found; give a torchvision state dict "
                             f"(.pth or .safetensors), or --pretrained alone for torchvision's download")


def _validate_numbers(config: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "image_size", "width_divisor", "hidden_size", "max_train_samples",
                 "max_eval_samples", "sync_every", "dist_timeout", "grad_accum_steps", "decode_workers"):
        check_positive(name, getattr(config, name))
    if config.batch_size % config.grad_accum_steps:
        raise UsageError(f"--batch-size {config.batch_size} does not split into --grad-accum-steps "
                         f"{config.grad_accum_steps} micro-batches; use a multiple of {config.grad_accum_steps}")
    if config.cuda_graphs and config.grad_accum_steps > 1:
        raise UsageError("--cuda-graphs records one whole step and cannot record --grad-accum-steps above 1; "
                         "leave one of them out")
    if config.channels not in (None, 1, 3):
        raise UsageError(f"--channels must be 1 (grey) or 3 (RGB), got {config.channels}")
    if config.data_size is not None:
        _check_range("data_size", config.data_size, 1, MAX_DATA_SIZE)
    for name in ("checkpoint_every", "keep_last", "random_crop_padding"):
        if getattr(config, name) < 0:
            raise UsageError(f"{flag(name)} must be 0 or more, got {getattr(config, name)}")
    _check_range("seed", config.seed, 0, MAX_SEED)
    _check_range("dist_timeout", config.dist_timeout, 1, MAX_DIST_TIMEOUT)
    _check_range("random_crop_padding", config.random_crop_padding, 0, MAX_CROP_PADDING)
    if not 0 < config.lr <= MAX_LR:
        raise UsageError(f"--lr must be a positive number no larger than {MAX_LR:.3g} (float32's largest), "
                         f"got {config.lr}")
    for name in ("momentum", "beta1", "beta2"):
        _check_range(name, getattr(config, name), 0, 1, high_open=True)
    if config.nesterov and config.momentum == 0:
        raise UsageError("--nesterov needs a --momentum above 0 (e.g. --momentum 0.9)")
    for name in ("mixup", "cutmix"):
        if not (math.isfinite(getattr(config, name)) and getattr(config, name) >= 0):
            raise UsageError(f"{flag(name)} must be a Beta distribution's alpha, above 0 (or 0: off), got "
                             f"{getattr(config, name)}")
    for name, high_open in (("weight_decay", False), ("label_smoothing", True), ("val_split", True),
                            ("hflip", False), ("random_erase", False), ("model_ema_decay", True),
                            ("mix_prob", False), ("mix_switch_prob", False)):
        _check_range(name, getattr(config, name), 0, 1, high_open=high_open)
    if config.clip_grad_norm is not None and not (math.isfinite(config.clip_grad_norm) and config.clip_grad_norm > 0):
        raise UsageError(f"--clip-grad-norm must be a positive number, got {config.clip_grad_norm}")
    _validate_fine_tuning(config)
    if not (math.isfinite(config.warmup_epochs) and 0 <= config.warmup_epochs <= config.epochs):
        raise UsageError(f"--warmup-epochs {config.warmup_epochs} must be between 0 and --epochs "
                         f"{config.epochs}: the warm-up cannot be longer than the run")


def _validate_fine_tuning(config: TrainConfig) -> None:
    if not (math.isfinite(config.feature_lr_scale) and 0 < config.feature_lr_scale
            and config.feature_lr_scale * config.lr <= MAX_LR):
        raise UsageError(f"--feature-lr-scale must be a positive number (the convolutions' share of --lr), got "
                         f"{config.feature_lr_scale}")
    if config.freeze_features and config.feature_lr_scale != 1.0:
        raise UsageError(f"--feature-lr-scale {config.feature_lr_scale} has nothing to scale with --freeze-features "
                         f"(the convolutions do not train); leave one of them out")


def _validate_paths(config: TrainConfig) -> None:
    if config.data_dir is not None and not Path(config.data_dir).is_dir():
        raise UsageError(f"--data-dir {config.data_dir}: not a directory; point it at a folder of images "
                         f"(see --help)")
    if config.class_names is not None and not Path(config.class_names).is_file():
        what = "not a regular file" if Path(config.class_names).exists() else "file not found"
        raise UsageError(f"--class-names {config.class_names}: {what}; give a text file with one class name per "
                         f"line")
    for tracker in ("wandb", "tensorboard"):
        if config.report_to in (tracker, "all") and importlib.util.find_spec(tracker) is None:
            raise UsageError(f"--report-to {config.report_to} needs the {tracker} package: pip install {tracker}")
    if config.resume == "auto" and config.output_dir is None:
        raise UsageError("--resume auto needs --output-dir: the run directory to continue (or start)")
    if config.resume not in (None, "auto") and not Path(config.resume).is_dir():
        raise UsageError(f"--resume {config.resume}: not a directory; pass 'auto' or a checkpoint directory")
    if config.output_dir is not None:
        check_writable_dir("output_dir", Path(config.output_dir))
    if config.cache_dir is not None:
        check_writable_dir("cache_dir", Path(config.cache_dir))


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
