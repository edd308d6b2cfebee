"""TrainState: everything a checkpoint holds, with `state_dict()` and `load_state_dict()`.

That is where training stands (Progress), the epoch's running loss and accuracy sums, the model,
optimizer, weight EMA and grad scaler it trains, and every random number generator of every process.
`vgg_dist.store` turns a state dict into checkpoint files and back; this module never touches a file.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from vgg_dist.fields import short
from vgg_dist.training.dist import unwrapped_state_dict
from vgg_dist.training.optim import ModelEMA

# Dropout streams of a fresh start, or of a resume on more processes than were saved: a seed per start
# step, spaced by a prime so that nearby steps never share one.
RESUME_SEED_STRIDE = 7919


@dataclasses.dataclass
class Progress:
    """Where training stands."""

    epoch: int = 0          # the epoch in progress (0-based)
    step_in_epoch: int = 0  # optimizer steps already taken in it
    global_step: int = 0
    best_acc: float | None = None  # of the best epoch so far: validation accuracy with --val-split, else test


@dataclasses.dataclass
class EpochSums:
    """An epoch's train-loss sum, correct predictions and sample count so far."""

    loss: float = 0.0
    correct: float = 0.0
    samples: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss / self.samples

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples


class RunningSums:
    """This process's EpochSums, kept on the device so that a step never waits for the host."""

    def __init__(self, device: torch.device):
        self.values = torch.zeros(3, dtype=torch.float64, device=device)

    def reset(self, start: EpochSums | None = None) -> None:
        """Start an epoch from nothing, or from the sums a resumed epoch had already reached."""
        start = start or EpochSums()
        self.values.copy_(torch.tensor([start.loss, start.correct, start.samples], dtype=torch.float64))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        batch = labels.shape[0]
        self.values[0] += loss * batch
        self.values[1] += (logits.argmax(dim=1) == labels).sum()
        self.values[2] += batch

    def reduced(self, accelerator: Accelerator) -> EpochSums:
        """All processes' sums together (a collective)."""
        return EpochSums(*accelerator.reduce(self.values.clone(), reduction="sum").tolist())


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's random number generators: tensors (torch, CUDA), and JSON (Python's, NumPy's)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, words, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(words), gauss],
                     "numpy": [name, keys.tolist(), position, has_gauss, cached]}


def set_rng_state(tensors: dict[str, torch.Tensor], json_state: dict,
                  python: random.Random | None = None, numpy: np.random.RandomState | None = None) -> None:
    """Load an `rng_state()` into this process's generators, or into the given scratch ones (which is how a
    checkpoint's states are checked before anything is changed)."""
    version, words, gauss = json_state["python"]
    name, keys, position, has_gauss, cached = json_state["numpy"]
    if python is not None:
        torch.Generator().set_state(tensors["torch"])
    else:
        torch.set_rng_state(tensors["torch"])
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"])
    (python or random).setstate((version, tuple(words), gauss))
    (numpy or np.random).set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))


def rng_state_problem(tensors: dict[str, torch.Tensor], json_state: dict) -> str | None:
    """Why an `rng_state()` read back from a file could not be loaded, found by loading it into scratch
    generators; None when it can be."""
    try:
        cuda = tensors.get("cuda")
        if cuda is not None and torch.cuda.is_available() and cuda.shape != torch.cuda.get_rng_state().shape:
            raise ValueError("CUDA generator state has the wrong size")
        set_rng_state(tensors, json_state, python=random.Random(), numpy=np.random.RandomState())
    except (ValueError, TypeError, KeyError, RuntimeError, IndexError) as error:
        return short(error)
    return None


class TrainState:
    """The model, optimizer, EMA and grad scaler of a run (prepared by Accelerate), where it stands, and
    the epoch's running sums. `state_dict()` and `load_state_dict()` hold exactly what a resume needs."""

    def __init__(self, *, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ema: ModelEMA | None, seed: int):
        self.accelerator, self.model, self.optimizer, self.ema, self.seed = accelerator, model, optimizer, ema, seed
        self.progress = Progress()
        self.sums = RunningSums(accelerator.device)

    def seed_fresh_streams(self) -> None:
        """A different dropout stream on each process (device_specific adds the process index)."""
        set_seed(self.seed + self.progress.global_step * RESUME_SEED_STRIDE, device_specific=True)

    def state_dict(self) -> dict:
        """Everything a resume needs. A collective: every process's generators are gathered and the sums
        reduced, so the result is complete on every process."""
        accelerator = self.accelerator
        return {"progress": dataclasses.replace(self.progress), "sums": self.sums.reduced(accelerator),
                "model": unwrapped_state_dict(accelerator, self.model),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": gather_object([rng_state()])}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state dict (as `vgg_dist.store` reads it back from a checkpoint, checked)."""
        self.progress = dataclasses.replace(state["progress"])
        # The saved sums are all processes' together: add them back once, not once per process.
        self.sums.reset(state["sums"] if self.accelerator.is_main_process else None)
        self.accelerator.unwrap_model(self.model, keep_torch_compile=False).load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accelerator.scaler is not None and state["scaler"]:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        ranks = state["rng"]
        if self.accelerator.process_index < len(ranks):
            set_rng_state(*ranks[self.accelerator.process_index])
        else:  # a resume on more processes than saved: the new ranks' dropout streams start afresh
            self.seed_fresh_streams()
