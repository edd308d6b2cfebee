"""Shared fixtures: tiny IDX datasets written on the fly, runs in this process or as real launches that
cannot outlive their test, and one two-process run that many tests read."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vgg_dist.data.synthetic import write_dataset

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = str(REPO / "vgg_dist" / "train.py")

# A model small enough that a CPU trains it in seconds: 32x32 input, channels / 16, 64-wide classifier.
TINY_MODEL = ["--image-size", "32", "--width-divisor", "16", "--hidden-size", "64"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: torch.compile, and the longest multi-process runs (real 2-process "
                                       "and 2-machine launches, signals, bitwise resume after SIGTERM); run with "
                                       "-m slow, as CI does")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """256 training and 77 test images: 77 is not a multiple of any batch x process count used here."""
    return write_dataset(tmp_path_factory.mktemp("tiny_data"), train=256, test=77, seed=1)


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("learnable_data"), train=1024, test=200, seed=2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def quiet_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Two processes on two cores: one thread each, or they fight over the cores.
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_bounded(command: list[str], timeout: float = 180, env: dict | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group (launchers and their
    workers), then fail the test."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env or quiet_env(), cwd=cwd or REPO, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(command)}\n{stdout}\n{stderr}")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything the command left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def launch_command(num_processes: int, *script_and_args: str) -> list[str]:
    """`accelerate launch` as a user types it; several processes on CPU form one gloo job."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if num_processes > 1:
        command += ["--multi_gpu", "--num_processes", str(num_processes)]
    else:
        command += ["--num_processes", "1"]
    return command + list(script_and_args)


def train(tmp_path: Path, data_dir: Path, *args: str, num_processes: int = 1, name: str = "run",
          timeout: float = 180) -> tuple[Path, subprocess.CompletedProcess]:
    """A real `accelerate launch` of the training script."""
    run_dir = tmp_path / name
    command = launch_command(num_processes, TRAIN_SCRIPT, "--data-dir", str(data_dir),
                             "--output-dir", str(run_dir), *args)
    result = run_bounded(command, timeout=timeout)
    assert result.returncode == 0, f"training failed:\n{result.stdout}\n{result.stderr}"
    return run_dir, result


@contextlib.contextmanager
def isolated_run():
    """Run a command's main() in this process as if it were its own: afterwards the signal handlers and
    Accelerate's process-wide state are what they were."""
    from accelerate.state import AcceleratorState, GradientState
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def run_main(main, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command's main() run in this process."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with isolated_run(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def train_here(tmp_path: Path, data_dir: Path, *args: str, name: str = "run", expect: int = 0) -> tuple[Path, str, str]:
    """Train in this process, one process (no launcher: seconds faster than `train`)."""
    from vgg_dist.train import main
    run_dir = tmp_path / name
    code, stdout, stderr = run_main(main, ["--data-dir", str(data_dir), "--output-dir", str(run_dir), *args])
    assert code == expect, f"exit {code}, expected {expect}:\n{stdout}\n{stderr}"
    return run_dir, stdout, stderr


def tiny_checkpoint(step: int) -> tuple[dict, object]:
    """(a state dict, its RunIdentity) as TrainState and the trainer would give them for a 10-weight
    model at `step`: enough for `vgg_dist.store.checkpoint.write` to write a complete checkpoint."""
    import torch
    from vgg_dist.config import parse_config
    from vgg_dist.store.checkpoint import RunIdentity
    from vgg_dist.training.setup import make_schedule
    from vgg_dist.training.state import EpochSums, Progress, rng_state
    config = parse_config([*TINY_MODEL], prog="test", description="test")
    identity = RunIdentity(spec=config.model_spec(1, 10), config=config, schedule=make_schedule(config, 100),
                           steps_per_epoch=100)
    state = {"progress": Progress(global_step=step, step_in_epoch=step), "sums": EpochSums(),
             "model": {"w": torch.full((10,), float(step))}, "ema": None,
             "optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "params": [0]}]}, "scaler": None,
             "rng": [rng_state()]}
    return state, identity


def stopped_copy(run_dir: Path, destination: Path, last_step: int) -> Path:
    """The run directory as a crash right after checkpoint `last_step` would have left it: later
    checkpoints and the final model gone, metrics possibly ahead of the checkpoint."""
    import shutil

    from vgg_dist.store import checkpoint
    shutil.copytree(run_dir, destination)
    (destination / "model.safetensors").unlink()
    for path in checkpoint.list_checkpoints(destination / "checkpoints"):
        if int(path.name.split("_")[1]) > last_step:
            shutil.rmtree(path)
    return destination


@contextlib.contextmanager
def mounted_tmpfs(mount: Path, size: str):
    """A real device of `size` (e.g. "6m") that fills up, at `mount`; skips the test where mounting is not
    allowed (it needs root, as CI has)."""
    mount.mkdir(exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root is needed): {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def saved_state(checkpoint: Path) -> dict:
    """A checkpoint's state.json as plain JSON."""
    return json.loads((checkpoint / "state.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model.safetensors")


def directory_bytes(path: Path) -> dict[Path, bytes]:
    """Every file under `path` with its contents, to show that a refusal changed nothing."""
    return {item: item.read_bytes() for item in sorted(path.rglob("*")) if item.is_file()}


# The run many tests read: two real gloo processes through the shipped CPU launch config, with a
# validation split, EMA weights, flip TTA, augmentation, TensorBoard and a forced progress bar.
SHARED_RUN_ARGS = [*TINY_MODEL, "--epochs", "2", "--batch-size", "8", "--val-split", "0.25", "--model-ema",
                   "--tta", "--hflip", "0.5", "--report-to", "tensorboard", "--progress"]


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, tiny_data) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("shared") / "run"
    result = run_bounded([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(REPO / "launch" / "cpu_multi_process.yaml"), "--main_process_port", str(free_port()),
                          TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir", str(run_dir), *SHARED_RUN_ARGS],
                         timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result
