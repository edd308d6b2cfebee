"""What a training checkpoint holds, and how it is checked and restored: progress, weights, optimizer
state, every rank's random number generators, and the epoch's partial metrics.

`checkpoint.py` writes and verifies the files; this module decides their contents. Nothing here talks
to other processes: the trainer gathers every rank's RNG state and the reduced sums, then hands them
over. Restoring is two steps, `read` (every check, nothing changed) and `apply` (change the model,
the optimizer and the generators), so a bad checkpoint is refused before anything is touched.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import random
from pathlib import Path

import numpy as np
import torch

from vgg_dist import artifacts, checkpoint
from vgg_dist.checkpoint import CheckpointError
from vgg_dist.cli import flag
from vgg_dist.ema import ModelEMA
from vgg_dist.model import ModelSpec
from vgg_dist.optim import LRSchedule

# Flags that fix which images each step sees; a checkpoint only continues a run that agrees on them.
DATA_ORDER_FLAGS = ("batch_size", "seed", "dataset", "max_train_samples", "val_split")
WEIGHTS_FILE, EMA_FILE = artifacts.WEIGHTS_NAME, artifacts.EMA_WEIGHTS_NAME  # the EMA's only with --model-ema
OPTIMIZER_FILE, RNG_FILE = "optimizer.safetensors", "rng.safetensors"


@dataclasses.dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0          # the epoch in progress (0-based)
    step_in_epoch: int = 0  # optimizer steps already taken in it
    global_step: int = 0
    best_acc: float | None = None  # of the best epoch so far: validation accuracy with --val-split, else test


@dataclasses.dataclass
class EpochSums:
    """The epoch's running train-loss sum, correct predictions and sample count, all processes together."""

    loss: float = 0.0
    correct: float = 0.0
    samples: float = 0.0

    def as_list(self) -> list[float]:
        return [self.loss, self.correct, self.samples]


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's random number generators: tensors (torch, CUDA), and JSON (Python's, NumPy's)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, words, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(words), gauss],
                     "numpy": [name, keys.tolist(), position, has_gauss, cached]}


def _python_state(entry) -> tuple:
    version, words, gauss = entry
    return version, tuple(words), gauss


def _numpy_state(entry) -> tuple:
    name, keys, position, has_gauss, cached = entry
    return name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached


def set_rng_state(tensors: dict[str, torch.Tensor], json_state: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    random.setstate(_python_state(json_state["python"]))
    np.random.set_state(_numpy_state(json_state["numpy"]))


def build(progress: Progress, sums: EpochSums, weights: dict[str, torch.Tensor], optimizer_state: dict,
          scaler_state: dict | None, every_rank_rng: list[tuple[dict, dict]], spec: ModelSpec,
          flags: dict, schedule: LRSchedule, ema_weights: dict[str, torch.Tensor] | None,
          ) -> tuple[dict[str, tuple[dict, dict]], dict]:
    """(tensor files for `checkpoint.save_checkpoint`, state.json) from what the trainer gathered."""
    optimizer_structure, optimizer_tensors = checkpoint.split_tensors(optimizer_state, "optimizer")
    rng_tensors = {f"rank{rank}.{kind}": tensor for rank, (tensors, _) in enumerate(every_rank_rng)
                   for kind, tensor in tensors.items()}
    state = {
        "progress": dataclasses.asdict(progress),
        "world_size": len(every_rank_rng),
        "partial_epoch_totals": sums.as_list(),  # reduced sums, so any world size can resume them
        "optimizer": optimizer_structure,
        "grad_scaler": scaler_state,
        "lr_schedule": schedule.describe(),
        "rng": [json_state for _, json_state in every_rank_rng],
        "model": spec.to_dict(),
        "flags": flags,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    tensor_files = {WEIGHTS_FILE: (weights, artifacts.weights_metadata(spec)),
                    OPTIMIZER_FILE: (optimizer_tensors, {}),
                    RNG_FILE: (rng_tensors, {})}
    if ema_weights is not None:
        tensor_files[EMA_FILE] = (ema_weights, artifacts.weights_metadata(spec))
    return tensor_files, state


@dataclasses.dataclass
class Restored:
    """A checkpoint read and checked in full, not yet applied to anything."""

    path: Path
    progress: Progress
    sums: EpochSums
    weights: dict[str, torch.Tensor]
    ema_weights: dict[str, torch.Tensor] | None
    optimizer_state: dict
    scaler_state: dict | None
    rng_tensors: dict[str, torch.Tensor] | None  # this rank's, when the saving run had this rank
    rng_json: dict | None


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read(path: Path, spec: ModelSpec, flags: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         schedule: LRSchedule, process_index: int, steps_per_epoch: int) -> Restored:
    """Verify a checkpoint completely and check that it continues this run; change nothing.

    Every field of state.json is checked for type, range and consistency with the model, the flags,
    the data (`steps_per_epoch`) and the other files; each failure is one CheckpointError line.
    """
    path = Path(path)
    checkpoint.verify(path)
    state = checkpoint.read_state(path)

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"{path / checkpoint.STATE}: {problem}")

    _check_same_run(path, state, refuse, spec, flags, schedule)
    progress = _read_progress(state.get("progress"), refuse, steps_per_epoch, flags["epochs"])
    sums = _read_sums(state.get("partial_epoch_totals"), refuse, progress.step_in_epoch * flags["batch_size"])
    weights = _read_weights(path / WEIGHTS_FILE, model)
    ema_weights = _read_weights(path / EMA_FILE, model) if flags["model_ema"] else None
    try:
        optimizer_state = checkpoint.join_tensors(state.get("optimizer"),
                                                  checkpoint.load_tensors(path / OPTIMIZER_FILE))
        _check_optimizer_state(optimizer_state, optimizer)
    except (ValueError, TypeError, KeyError) as error:
        raise refuse(f"optimizer state does not fit this optimizer ({error})") from None
    scaler_state = state.get("grad_scaler")
    if scaler_state is not None and not isinstance(scaler_state, dict):
        raise refuse("grad_scaler must be a mapping or null")
    every_rng = _read_every_rank_rng(path, state, refuse)
    mine = every_rng[process_index] if process_index < len(every_rng) else (None, None)
    return Restored(path, progress, sums, weights, ema_weights, optimizer_state, scaler_state, *mine)


def _check_same_run(path: Path, state: dict, refuse, spec: ModelSpec, flags: dict, schedule: LRSchedule) -> None:
    """The checkpoint continues this run: the same model, data order, learning-rate curve and EMA."""
    try:
        saved_spec = ModelSpec.from_dict(state.get("model"))
    except ValueError as error:
        raise refuse(f"malformed model spec ({error})") from None
    if saved_spec != spec:
        changed = [f"{key} {value} here {getattr(spec, key)}" for key, value in saved_spec.to_dict().items()
                   if getattr(spec, key) != value]
        raise CheckpointError(f"{path}: holds a different model ({', '.join(changed)}); resume with the flags "
                              f"it was trained with")
    saved_flags = state.get("flags")
    if not isinstance(saved_flags, dict):
        raise refuse("'flags' must be a mapping")
    for name in DATA_ORDER_FLAGS:
        if saved_flags.get(name) != flags[name]:
            raise CheckpointError(f"{path}: was trained with {flag(name)} {saved_flags.get(name)}, not "
                                  f"{flags[name]}; the data order would change, so pass the same value")
    if state.get("lr_schedule") != schedule.describe():
        raise CheckpointError(f"{path}: follows the learning-rate schedule {state.get('lr_schedule')}, this run "
                              f"{schedule.describe()}; pass the same --lr, --lr-schedule, --warmup-epochs and "
                              f"--epochs so the resumed run continues the same curve")
    has_ema = (path / EMA_FILE).exists()
    if has_ema != flags["model_ema"]:
        raise CheckpointError(f"{path}: was trained {'with' if has_ema else 'without'} --model-ema; resume "
                              f"{'with' if has_ema else 'without'} it")


def _read_every_rank_rng(path: Path, state: dict, refuse) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """(tensor states, JSON states) of every rank that saved, each checked by loading it into scratch
    generators: a resume that could not continue every stream exactly is refused."""
    world_size = state.get("world_size")
    if not _whole(world_size) or world_size < 1:
        raise refuse(f"world_size must be a positive integer, got {world_size!r}")
    json_states = state.get("rng")
    if not isinstance(json_states, list) or len(json_states) != world_size:
        raise refuse(f"'rng' must hold one entry per rank ({world_size})")
    tensors = checkpoint.load_tensors(path / RNG_FILE)
    every_rank = []
    for rank in range(world_size):
        prefix = f"rank{rank}."
        mine = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        try:
            _check_rng(mine, json_states[rank])
        except (ValueError, TypeError, KeyError, RuntimeError, IndexError) as error:
            raise CheckpointError(f"{path}: random generator state of rank {rank} is unusable ({error}); "
                                  f"resuming would not continue the run exactly") from None
        every_rank.append((mine, json_states[rank]))
    return every_rank


def _read_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    metadata, layout = checkpoint.read_header(path)
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    if {name: shape for name, (_, shape) in layout.items()} != expected:
        raise CheckpointError(f"{path}: tensor names or shapes do not match the model")
    if artifacts.SPEC_METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: header has no model spec")
    return checkpoint.load_tensors(path)


def _read_progress(values, refuse, steps_per_epoch: int, epochs: int) -> Progress:
    fields = {field.name for field in dataclasses.fields(Progress)}
    if not isinstance(values, dict) or set(values) != fields:
        raise refuse(f"'progress' must hold exactly {', '.join(sorted(fields))}")
    for name in ("epoch", "step_in_epoch", "global_step"):
        if not _whole(values[name]) or values[name] < 0:
            raise refuse(f"progress.{name} must be a whole number of at least 0, got {values[name]!r}")
    best = values["best_acc"]
    if best is not None and not (_number(best) and 0 <= best <= 1):
        raise refuse(f"progress.best_acc must be null or in [0, 1], got {best!r}")
    progress = Progress(**values)
    if progress.step_in_epoch > steps_per_epoch:
        raise refuse(f"progress.step_in_epoch {progress.step_in_epoch} is beyond the {steps_per_epoch} steps "
                     f"an epoch has on this data")
    if progress.global_step != progress.epoch * steps_per_epoch + progress.step_in_epoch:
        raise refuse(f"progress.global_step {progress.global_step} is not epoch {progress.epoch} x "
                     f"{steps_per_epoch} steps + {progress.step_in_epoch}; was it trained on other data?")
    if progress.epoch > epochs or (progress.epoch == epochs and progress.step_in_epoch):
        raise refuse(f"the checkpoint is past the end of a {epochs}-epoch run (epoch {progress.epoch + 1}); "
                     f"pass --epochs {progress.epoch + 1} or more")
    return progress


def _read_sums(values, refuse, samples: int) -> EpochSums:
    if not isinstance(values, list) or len(values) != 3 or not all(_number(value) and value >= 0 for value in values):
        raise refuse("partial_epoch_totals must be three finite sums of at least 0 (loss, correct, samples)")
    sums = EpochSums(*values)
    if sums.samples != samples or sums.correct > sums.samples:
        raise refuse(f"partial_epoch_totals count {sums.samples:g} samples where the progress implies {samples}")
    return sums


def _check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """The saved optimizer state has this optimizer's groups and per-parameter tensor shapes."""
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise ValueError("expected 'state' and 'param_groups'")
    ours = optimizer.state_dict()["param_groups"]
    groups = saved["param_groups"]
    if not isinstance(groups, list) or [g.get("params") if isinstance(g, dict) else None for g in groups] != \
            [group["params"] for group in ours]:
        raise ValueError("parameter groups differ")
    shapes = {index: parameter.shape for index, parameter in
              enumerate(parameter for group in optimizer.param_groups for parameter in group["params"])}
    if not isinstance(saved["state"], dict):
        raise ValueError("'state' must be a mapping")
    for index, entry in saved["state"].items():
        if index not in shapes or not isinstance(entry, dict):
            raise ValueError(f"state for unknown parameter {index!r}")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shapes[index]:
                raise ValueError(f"{name} of parameter {index} has shape {list(value.shape)}, the parameter "
                                 f"{list(shapes[index])}")


def _check_rng(tensors: dict[str, torch.Tensor], json_state) -> None:
    """Apply the state to scratch generators: whatever they refuse, the real ones would too."""
    if "torch" not in tensors:
        raise KeyError("no torch generator state")
    torch.Generator().set_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available() and tensors["cuda"].shape != torch.cuda.get_rng_state().shape:
        raise ValueError("CUDA generator state has the wrong size")
    if not isinstance(json_state, dict):
        raise TypeError("expected a mapping with python and numpy states")
    random.Random().setstate(_python_state(json_state["python"]))
    np.random.RandomState().set_state(_numpy_state(json_state["numpy"]))


def apply(restored: Restored, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler,
          ema: ModelEMA | None) -> None:
    """Load a checked checkpoint into the bare model, its EMA, the optimizer and the grad scaler."""
    model.load_state_dict(restored.weights)
    if ema is not None:
        ema.load_state_dict(restored.ema_weights)
    try:
        optimizer.load_state_dict(restored.optimizer_state)
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{restored.path}: optimizer state does not fit ({error})") from None
    if scaler is not None and restored.scaler_state:
        scaler.load_state_dict(restored.scaler_state)
