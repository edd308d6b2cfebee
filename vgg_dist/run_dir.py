"""The run directory: which one a run writes into, and which checkpoint in it a resume continues from.

The global main process decides and creates it; every other process learns its name.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from vgg_dist import checkpoint
from vgg_dist.accelerated import say
from vgg_dist.artifacts import CONFIG_NAME
from vgg_dist.config import TrainConfig
from vgg_dist.errors import UsageError
from vgg_dist.run_files import METRICS_NAME

RUNS_ROOT = Path("runs")


def choose_run_dir(accelerator: Accelerator, config: TrainConfig) -> Path:
    """The main process picks (and creates) the run directory; every process learns its name."""
    chosen = [None]
    if accelerator.is_main_process:
        if config.output_dir is not None:
            path = Path(config.output_dir)
        elif config.resume not in (None, "auto"):
            path = Path(config.resume).resolve().parent.parent  # RUN_DIR/checkpoints/step_N
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            path, suffix = RUNS_ROOT / stamp, 1
            while path.exists():
                path, suffix = RUNS_ROOT / f"{stamp}-{suffix}", suffix + 1
        path.mkdir(parents=True, exist_ok=True)
        chosen = [str(path)]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


def resolve_resume(accelerator: Accelerator, config: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start fresh."""
    if config.resume is None:
        return None
    if config.resume != "auto":
        return Path(config.resume)
    latest = checkpoint.find_latest(run_dir / checkpoint.CHECKPOINTS_DIR, say=lambda line: say(accelerator, line))
    if latest is None and any((run_dir / name).exists() for name in (CONFIG_NAME, METRICS_NAME)):
        raise UsageError(f"--output-dir {run_dir} holds a run but no complete checkpoint to resume; "
                         f"choose a new directory so that run is not overwritten")
    return latest
