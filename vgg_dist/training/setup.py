"""What a run builds before its first step: the model and optimizer, the learning-rate schedule, the
augmenter, and torch.compile with its cache; each refusing, before any work, what cannot run."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vgg_dist.config import TrainConfig
from vgg_dist.data.augment import Augmentation, BatchAugmenter
from vgg_dist.data.auto_augment import parse_policy
from vgg_dist.data.mix import Mixing
from vgg_dist.errors import UsageError
from vgg_dist.model import ModelSpec, build_model, feature_layers
from vgg_dist.pretrained import load_pretrained
from vgg_dist.training import sync_batchnorm
from vgg_dist.training.optim import LRSchedule, make_adamw, make_sgd, parameter_groups

# fp32 copies of every parameter while training: weights, gradients, momentum, and the EMA's weights;
# AdamW keeps two moments where SGD keeps one momentum.
TRAINING_COPIES = {"sgd": 4, "adamw": 5}
COMPILE_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def build_model_and_optimizer(accelerator: Accelerator, config: TrainConfig,
                              spec: ModelSpec) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The bare model (seeded first, so every process starts from the same weights) and its optimizer."""
    check_fits_in_memory(spec, accelerator.device, TRAINING_COPIES[config.optimizer])
    set_seed(config.seed)
    model = build_model(spec, fusable_pool=config.fused_pool)
    if config.pretrained is not None:  # after the seeded build: every process keeps the same fresh last layer
        load_pretrained(model, spec, config.pretrained, accelerator.main_process_first)
    if config.batch_norm and config.sync_bn and accelerator.num_processes > 1:
        model = sync_batchnorm.synchronise(model, accelerator.device)
    if config.freeze_features:  # after synchronise, whose new BatchNorm layers would require gradients again
        feature_layers(model).requires_grad_(False)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    on_gpu = accelerator.device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithm once
    return model, make_optimizer(model, config, fused=on_gpu)


def make_optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """--optimizer's optimizer over the bare model's trainable parameters (not the frozen features), the
    convolutions in groups of their own with --feature-lr-scale."""
    groups = parameter_groups(model, config.weight_decay, config.feature_lr_scale)
    if config.optimizer == "adamw":
        return make_adamw(groups, config.lr, (config.beta1, config.beta2), config.weight_decay, fused)
    return make_sgd(groups, config.lr, config.momentum, config.nesterov, config.weight_decay, fused)


def check_fits_in_memory(spec: ModelSpec, device: torch.device, copies: int = TRAINING_COPIES["sgd"]) -> None:
    """Refuse a model whose parameters alone would not fit in the device's memory, before allocating it
    (a --hidden-size typo should be one line, not an out-of-memory crash or a swapping machine)."""
    parameters = spec.parameter_count()
    needed = parameters * 4 * copies
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise UsageError(f"the model has {parameters:,} parameters: training needs about {needed / 2**30:,.0f} GiB, "
                         f"more than this {device.type.upper()}'s {available / 2**30:,.0f} GiB; lower --hidden-size, "
                         f"--image-size or raise --width-divisor")


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> LRSchedule:
    return LRSchedule(config.lr_schedule, config.lr, warmup_steps=round(config.warmup_epochs * steps_per_epoch),
                      total_steps=config.epochs * steps_per_epoch)


def make_augmenter(accelerator: Accelerator, config: TrainConfig) -> BatchAugmenter | None:
    mixing = Mixing(config.mixup, config.cutmix, config.mix_prob, config.mix_switch_prob)
    augmentation = Augmentation(config.random_crop_padding, config.hflip, config.random_erase, mixing,
                                auto_augment=parse_policy(config.auto_augment))
    if not augmentation:
        return None
    return BatchAugmenter(augmentation, accelerator.device, config.seed, accelerator.process_index,
                          accelerator.num_processes, config.batch_size)


def check_cuda_graphs(accelerator: Accelerator, config: TrainConfig) -> None:
    """--cuda-graphs records one GPU's step: say which launch it does not fit, before any work."""
    if not config.cuda_graphs:
        return
    if config.compile_mode == "reduce-overhead":
        raise UsageError("--cuda-graphs and --compile-mode reduce-overhead both record CUDA graphs; use one "
                         "(--cuda-graphs records the optimizer's update too)")
    if accelerator.device.type != "cuda":
        raise UsageError("--cuda-graphs needs a GPU and none is visible; leave it out on a CPU")
    if accelerator.num_processes > 1:
        raise UsageError(f"--cuda-graphs records one process's step and this launch has "
                         f"{accelerator.num_processes}; leave it out with several processes")
    if accelerator.mixed_precision == "fp16":
        raise UsageError("--cuda-graphs cannot record fp16's loss scaling, which checks for infinities on the "
                         "host; use --mixed_precision bf16 or no")


def compiles(config: TrainConfig, device: torch.device) -> bool:
    """--compile as given, or by default on GPUs only (docs/performance.md has the measurements behind this)."""
    return config.compile if config.compile is not None else device.type == "cuda"


def compile_cache_dir() -> Path:
    """Where torch.compile (its compiler is called Inductor) keeps compiled graphs and kernels, so a second
    run does not compile again: $TORCHINDUCTOR_CACHE_DIR if the user set it, else a per-user cache
    (Inductor's own default is under /tmp, which clusters often clear at the end of every job). Inductor
    writes its default into the variable when it first looks, so that value counts as unset. A directory
    that cannot be created or written is refused in one line."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        inductor_default = os.path.abspath(default_cache_dir())
    except (ImportError, OSError):  # older PyTorch sets no default; an unusable one counts as unset
        inductor_default = None
    if os.environ.get(COMPILE_CACHE_VARIABLE) in (None, inductor_default):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ[COMPILE_CACHE_VARIABLE] = str(base / "vgg_dist" / "torchinductor")
    path = Path(os.environ[COMPILE_CACHE_VARIABLE])
    problem = _unusable_directory(path)
    if problem:
        raise UsageError(f"the torch.compile cache {path} cannot be used ({problem}); set {COMPILE_CACHE_VARIABLE} "
                         f"(or XDG_CACHE_HOME) to a writable directory, or pass --no-compile")
    return path


def _unusable_directory(path: Path) -> str | None:
    """Why `path` cannot be created and written. What this creates to find out, it removes again: the
    compiler makes the directory when it first needs it, and a run refused later leaves nothing behind."""
    missing = [directory for directory in [path.absolute(), *path.absolute().parents] if not os.path.lexists(directory)]
    try:
        for directory in reversed(missing):
            directory.mkdir()
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable"
    except OSError as error:
        return error.strerror or str(error)
    finally:
        for directory in missing:
            with contextlib.suppress(OSError):
                directory.rmdir()
    return None


def settle_compile_cache(config: TrainConfig, device: torch.device) -> None:
    """Before anything imports the compiler (building an optimizer does): a compiled run checks its cache
    directory and refuses an unusable one in one line; an eager run, which never compiles, moves an
    unusable $TORCHINDUCTOR_CACHE_DIR aside to a private temporary one, since the compiler creates it
    on import all the same."""
    if compiles(config, device):
        compile_cache_dir()
        return
    given = os.environ.get(COMPILE_CACHE_VARIABLE)
    if given is not None and _unusable_directory(Path(given)):
        # One per user, reused by every eager run: a fresh directory per run would pile up in /tmp.
        os.environ[COMPILE_CACHE_VARIABLE] = str(Path(tempfile.gettempdir()) / f"vgg_dist-inductor-{os.getuid()}")


def maybe_compile(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    if not compiles(config, device):
        return model
    compile_cache_dir()
    # dynamic=False: batches are always full (Accelerate evens out the last one), so shapes never change.
    return torch.compile(model, dynamic=False, mode=None if config.compile_mode == "default" else config.compile_mode)
