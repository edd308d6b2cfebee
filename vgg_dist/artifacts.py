"""The portable result of a run: `model.safetensors` + `config.json`, written atomically, checked on load.

The model's spec is stored twice on purpose: in `config.json` for people and tools, and in the
safetensors header so that a weights file on its own can be checked against a model before loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vgg_dist.errors import UsageError
from vgg_dist.model import ModelSpec, build_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
SPEC_METADATA_KEY = "vgg_dist.model_spec"

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomically(path: Path, write) -> None:
    """Call `write(temporary_path)`, flush it to disk, then rename over `path`: readers see the old
    file or the new one, never half of one."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from the rest of a team
    try:
        write(Path(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable only once its directory is)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: Path, value) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(value, indent=2) + "\n"))


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def weights_metadata(spec: ModelSpec) -> dict[str, str]:
    """The safetensors header entries that let a weights file be checked against a model before loading."""
    return {"format": "pt", SPEC_METADATA_KEY: json.dumps(spec_dict(spec), sort_keys=True)}


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    write_atomically(path, lambda temporary: save_file(tensors, temporary, metadata=weights_metadata(spec)))


def spec_dict(spec: ModelSpec) -> dict:
    return dataclasses.asdict(spec)


def read_weights_spec(path: Path) -> ModelSpec:
    """The spec stored in a weights file's header, read without loading any tensor."""
    try:
        with safe_open(path, framework="pt") as weights:
            metadata = weights.metadata() or {}
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise UsageError(f"{path}: not a valid safetensors file ({error})") from None
    if SPEC_METADATA_KEY not in metadata:
        raise UsageError(f"{path}: has no vgg_dist model spec in its header; was it written by vgg_dist?")
    return _parse_spec(path, json.loads(metadata[SPEC_METADATA_KEY]))


def _parse_spec(path: Path, values: dict) -> ModelSpec:
    try:
        spec = ModelSpec.from_dict(values)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{path}: model spec is not one vgg_dist understands ({error})") from None
    if spec.problems():
        name, message = spec.problems()[0]
        raise UsageError(f"{path}: model spec is invalid ({name} {message})")
    return spec


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG_NAME
    if not Path(run_dir).is_dir():
        raise UsageError(f"--checkpoint {run_dir}: not a directory; pass a run directory written by training")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--checkpoint {run_dir}: no {CONFIG_NAME}; pass a run directory written by "
                         f"training") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise UsageError(f"{path}: has no 'model' section; was it written by vgg_dist?")
    return config


def load_model(run_dir: Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from a run directory's config.json + model.safetensors alone."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    spec = _parse_spec(run_dir / CONFIG_NAME, config["model"])
    weights_path = run_dir / WEIGHTS_NAME
    stored = read_weights_spec(weights_path)
    if stored != spec:
        raise UsageError(f"{weights_path}: its header describes {spec_dict(stored)} but {CONFIG_NAME} "
                         f"describes {spec_dict(spec)}; the two files do not belong together")
    model = build_model(spec)
    try:
        model.load_state_dict(load_file(weights_path))
    except (SafetensorError, RuntimeError, OSError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise UsageError(f"{weights_path}: weights do not fit the model ({first_line})") from None
    model.eval()
    return model, config
