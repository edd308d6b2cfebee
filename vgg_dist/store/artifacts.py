"""The portable result of a run: `model.safetensors` + `config.json`, written atomically, checked on load.

The model's spec is stored twice on purpose: in `config.json` for people and tools, and in the
safetensors header so that a weights file on its own can be checked against a model before loading.
Evaluation and prediction load from a run directory (its final weights), from one of its checkpoints
(`RUN/checkpoints/step_N`), or from the best checkpoint (`RUN/checkpoints/best`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vgg_dist.data.sources import DATASETS
from vgg_dist.errors import UsageError
from vgg_dist.model import ModelSpec, build_model
from vgg_dist.store import checkpoint
from vgg_dist.store.files import (check_weights_header, load_tensors, read_header, read_record, save_tensors,
                                  write_atomically)
from vgg_dist.store.run_files import CONFIG_NAME, RunInfo, read_run_info

WEIGHTS_NAME = checkpoint.WEIGHTS_FILE


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    metadata = {**checkpoint.weights_metadata(spec), "vgg_dist.file": Path(path).name}  # not the temporary's name
    write_atomically(path, lambda temporary: save_tensors(temporary, state_dict, metadata))


def read_weights_spec(path: Path) -> ModelSpec:
    """The spec stored in a weights file's header, read without loading any tensor."""
    metadata, _ = read_header(path)
    if checkpoint.SPEC_METADATA_KEY not in metadata:
        raise UsageError(f"{path}: has no vgg_dist model spec in its header; was it written by vgg_dist?")
    try:
        spec = ModelSpec.from_dict(json.loads(metadata[checkpoint.SPEC_METADATA_KEY]))
        spec.check()
    except (ValueError, UsageError) as error:
        raise UsageError(f"{path}: model spec in the header is not one vgg_dist can build ({error})") from None
    return spec


def _loose_checkpoint_info(checkpoint_dir: Path) -> RunInfo:
    """What a checkpoint outside any run says about itself, from its state.json."""
    saved = read_record(checkpoint_dir / checkpoint.STATE, checkpoint.SavedState)
    flags = saved.flags
    if flags.dataset not in DATASETS:  # only the run's config.json names another dataset's classes
        raise UsageError(f"--checkpoint {checkpoint_dir}: a checkpoint of a {flags.dataset} run outside its run "
                         f"directory; its class names are in that run's {CONFIG_NAME}, so pass the checkpoint "
                         f"inside its run (RUN/{checkpoint.CHECKPOINTS_DIR}/{checkpoint_dir.name})")
    return RunInfo(model=saved.model, class_names=list(DATASETS[flags.dataset].class_names),
                   class_names_from=flags.dataset,
                   dataset=flags.dataset, data_source=flags.data_dir or "hub", source_image_size=[28, 28],
                   background=None, train_samples=0, train_samples_per_epoch=0, val_samples=None, test_samples=0,
                   flags=flags, launch={})


def resolve_weights(path: Path) -> tuple[Path, RunInfo]:
    """(weights file, run description) for a run directory, a checkpoint directory, or RUN/checkpoints/best:
    the weights the run evaluated (with --model-ema, the average's)."""
    path = Path(path)
    if path.name == "best" and path.parent.name == checkpoint.CHECKPOINTS_DIR and not path.exists():
        best = checkpoint.best_checkpoint(path.parent)
        if best is None and not os.path.lexists(path.parent / checkpoint.BEST_POINTER):
            raise UsageError(f"--checkpoint {path}: {path.parent} has no {checkpoint.BEST_POINTER} yet; the run has "
                             f"not finished an epoch with checkpoints on")
        if best is None:
            raise UsageError(f"--checkpoint {path}: no valid {checkpoint.BEST_POINTER} in {path.parent} (it must "
                             f"name a step_N checkpoint there)")
        if not best.is_dir():
            raise UsageError(f"--checkpoint {path}: {path.parent / checkpoint.BEST_POINTER} names {best.name}, which "
                             f"is gone; pass one of the checkpoints in {path.parent}")
        path = best
    if not path.is_dir():
        raise UsageError(f"--checkpoint {path}: not a directory; pass a run directory written by training, "
                         f"or one of its checkpoints")
    if (path / checkpoint.MANIFEST).exists():
        checkpoint.verify(path)
        run_dir = path.parent.parent
        info = read_run_info(run_dir) if (run_dir / CONFIG_NAME).is_file() else _loose_checkpoint_info(path)
        ema = path / checkpoint.EMA_FILE
        return (ema if ema.exists() else path / WEIGHTS_NAME), info
    if not (path / CONFIG_NAME).exists():
        raise UsageError(f"--checkpoint {path}: no {CONFIG_NAME}; pass a run directory written by training, "
                         f"or one of its checkpoints")
    if not os.path.lexists(path / WEIGHTS_NAME):
        raise UsageError(f"--checkpoint {path}: no {WEIGHTS_NAME}, which a run writes when it finishes; pass one "
                         f"of its checkpoints ({path / checkpoint.CHECKPOINTS_DIR}/best or step_N)")
    return path / WEIGHTS_NAME, read_run_info(path)


def load_model(path: Path) -> tuple[torch.nn.Module, RunInfo]:
    """Rebuild a trained model from its weights and config, checking that they belong together before
    allocating anything (a config that describes a huge model must not exhaust memory first)."""
    weights_path, info = resolve_weights(path)
    stored = read_weights_spec(weights_path)
    if stored != info.model:
        raise UsageError(f"{weights_path}: its header describes {stored.to_dict()} but the run's config "
                         f"describes {info.model.to_dict()}; the two do not belong together")
    with torch.device("meta"):
        expected = {name: list(tensor.shape) for name, tensor in build_model(stored).state_dict().items()}
    check_weights_header(weights_path, expected, checkpoint.SPEC_METADATA_KEY, "the model its header describes")
    model = build_model(stored)
    model.load_state_dict(load_tensors(weights_path))
    return model.eval(), info
