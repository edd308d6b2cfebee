"""The portable result of a run: `model.safetensors` + `config.json`, written atomically, checked on load.

The model's spec is stored twice on purpose: in `config.json` for people and tools, and in the
safetensors header so that a weights file on its own can be checked against a model before loading.
Evaluation and prediction load from a run directory (its final weights), from one of its checkpoints
(`RUN/checkpoints/step_N`), or from the best checkpoint (`RUN/checkpoints/best`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vgg_dist import checkpoint
from vgg_dist.atomic import write_atomically
from vgg_dist.data import DATASETS
from vgg_dist.errors import UsageError
from vgg_dist.model import ModelSpec, build_model

WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "ema.safetensors"  # in checkpoints of runs with --model-ema: the weights they evaluated
CONFIG_NAME = "config.json"
SPEC_METADATA_KEY = "vgg_dist.model_spec"
# predict resizes a new image to the dataset's own resolution first; beyond this a config is not believable.
MAX_SOURCE_SIDE = 4096


def weights_metadata(spec: ModelSpec) -> dict[str, str]:
    """The safetensors header entries that let a weights file be checked against a model before loading."""
    return {"format": "pt", SPEC_METADATA_KEY: json.dumps(spec.to_dict(), sort_keys=True)}


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    write_atomically(path, lambda temporary: save_file(tensors, temporary, metadata=weights_metadata(spec)))


def read_weights_spec(path: Path) -> ModelSpec:
    """The spec stored in a weights file's header, read without loading any tensor."""
    if not path.exists():
        raise UsageError(f"{path}: file not found")
    metadata, _ = checkpoint.read_header(path)
    if SPEC_METADATA_KEY not in metadata:
        raise UsageError(f"{path}: has no vgg_dist model spec in its header; was it written by vgg_dist?")
    try:
        values = json.loads(metadata[SPEC_METADATA_KEY])
    except ValueError as error:
        raise UsageError(f"{path}: model spec in the header is not JSON ({error})") from None
    return parse_spec(path, values)


def parse_spec(path: Path, values) -> ModelSpec:
    try:
        spec = ModelSpec.from_dict(values)
        spec.check()
    except (TypeError, ValueError, UsageError) as error:
        raise UsageError(f"{path}: model spec is not one vgg_dist can build ({error})") from None
    return spec


def read_run_config(run_dir: Path) -> dict:
    """A run's config.json, with every field that evaluate and predict use checked."""
    path = Path(run_dir) / CONFIG_NAME
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UsageError(f"--checkpoint {run_dir}: no {CONFIG_NAME}; pass a run directory written by "
                         f"training, or one of its checkpoints") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise UsageError(f"{path}: has no 'model' section; was it written by vgg_dist?")
    spec = parse_spec(path, config["model"])
    if not isinstance(config.get("flags", {}), dict):
        raise UsageError(f"{path}: 'flags' must be a mapping")
    if config.get("dataset", "fashion_mnist") not in DATASETS:
        raise UsageError(f"{path}: unknown dataset {config.get('dataset')!r}")
    names = config.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != spec.num_classes
                              or not all(isinstance(name, str) for name in names)):
        raise UsageError(f"{path}: class_names must list {spec.num_classes} names, one per class")
    size = config.get("source_image_size", [28, 28])
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(side, int) and not isinstance(side, bool) and 1 <= side <= MAX_SOURCE_SIDE
                       for side in size)):
        raise UsageError(f"{path}: source_image_size must be [height, width], each 1 to {MAX_SOURCE_SIDE}")
    return config


def _checkpoint_run_config(checkpoint_dir: Path) -> dict:
    """What a checkpoint directory's run says about it: the run's config.json where there is one,
    otherwise what the checkpoint's own state.json records."""
    run_dir = checkpoint_dir.parent.parent
    if (run_dir / CONFIG_NAME).is_file():
        return read_run_config(run_dir)
    state = checkpoint.read_state(checkpoint_dir)
    flags = state.get("flags") if isinstance(state.get("flags"), dict) else {}
    dataset = flags.get("dataset", "fashion_mnist")
    if dataset not in DATASETS:
        raise UsageError(f"{checkpoint_dir / checkpoint.STATE}: unknown dataset {dataset!r}")
    return {"model": state.get("model"), "flags": flags, "dataset": dataset,
            "class_names": list(DATASETS[dataset].class_names)}


def resolve_weights(path: Path) -> tuple[Path, dict]:
    """(weights file, run config) for a run directory, a checkpoint directory, or RUN/checkpoints/best:
    the weights the run evaluated (with --model-ema, the average's)."""
    path = Path(path)
    if path.name == "best" and path.parent.name == checkpoint.CHECKPOINTS_DIR and not path.exists():
        best = checkpoint.best_checkpoint(path.parent)
        if best is None:
            raise UsageError(f"--checkpoint {path}: no {checkpoint.BEST_POINTER} in {path.parent}; the run "
                             f"has not finished an epoch with checkpoints on")
        path = path.parent / best
    if not path.is_dir():
        raise UsageError(f"--checkpoint {path}: not a directory; pass a run directory written by training, "
                         f"or one of its checkpoints")
    if (path / checkpoint.MANIFEST).exists():
        checkpoint.verify(path)
        evaluated = path / EMA_WEIGHTS_NAME if (path / EMA_WEIGHTS_NAME).exists() else path / WEIGHTS_NAME
        return evaluated, _checkpoint_run_config(path)
    return path / WEIGHTS_NAME, read_run_config(path)


def load_model(path: Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from its weights and config, checking that they belong together before
    allocating anything (a config that describes a huge model must not exhaust memory first)."""
    weights_path, config = resolve_weights(path)
    spec = parse_spec(weights_path.parent, config["model"])
    stored = read_weights_spec(weights_path)
    if stored != spec:
        raise UsageError(f"{weights_path}: its header describes {stored.to_dict()} but the run's config "
                         f"describes {spec.to_dict()}; the two do not belong together")
    with torch.device("meta"):
        expected = {name: list(tensor.shape) for name, tensor in build_model(spec).state_dict().items()}
    _, layout = checkpoint.read_header(weights_path)
    if {name: shape for name, (_, shape) in layout.items()} != expected:
        raise UsageError(f"{weights_path}: tensor names or shapes do not fit the model its header describes")
    model = build_model(spec)
    model.load_state_dict(checkpoint.load_tensors(weights_path))
    model.eval()
    return model, config
