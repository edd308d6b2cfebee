"""Shared fixtures: tiny IDX datasets written on the fly, and launches that cannot outlive their test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vgg_dist.synthetic import write_dataset

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = str(REPO / "vgg_dist" / "train.py")

# A model small enough that a CPU trains it in seconds: 32x32 input, channels / 16, 64-wide classifier.
TINY_MODEL = ["--image-size", "32", "--width-divisor", "16", "--hidden-size", "64"]


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
    run_dir = tmp_path / name
    command = launch_command(num_processes, TRAIN_SCRIPT, "--data-dir", str(data_dir),
                             "--output-dir", str(run_dir), *args)
    result = run_bounded(command, timeout=timeout)
    assert result.returncode == 0, f"training failed:\n{result.stdout}\n{result.stderr}"
    return run_dir, result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model.safetensors")
