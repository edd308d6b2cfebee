"""No run is overwritten: one writer per run directory, resumes only into their own run, and a run that
has finished stays finished whatever signal arrives."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_MODEL, TRAIN_SCRIPT, directory_bytes, quiet_env, read_metrics, train_here
from vgg_dist.store import lock as run_lock
from vgg_dist.errors import UsageError
from vgg_dist.store.lock import LOCK_NAME, RunLock

QUICK = [*TINY_MODEL, "--epochs", "1", "--batch-size", "32"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data):
    run_dir, _, _ = train_here(tmp_path_factory.mktemp("finished"), tiny_data, *QUICK)
    return run_dir


def test_resume_into_another_finished_run_is_refused_and_changes_nothing(finished_run, tiny_data, tmp_path):
    other, _, _ = train_here(tmp_path, tiny_data, *QUICK, "--seed", "1", name="other")
    before = directory_bytes(other)
    checkpoint_of_another_run = finished_run / "checkpoints" / "step_0000008"
    _, _, stderr = train_here(tmp_path, tiny_data, *QUICK, "--resume", str(checkpoint_of_another_run), name="other",
                              expect=2)
    assert f"--output-dir {other} holds another run" in stderr and str(finished_run) in stderr
    assert directory_bytes(other) == before


def test_resume_from_a_checkpoint_outside_a_run_needs_a_new_output_dir(finished_run, tiny_data, tmp_path):
    loose = shutil.copytree(finished_run / "checkpoints" / "step_0000008", tmp_path / "somewhere" / "step_0000008")
    from vgg_dist.train import main

    from conftest import run_main
    code, _, stderr = run_main(main, ["--data-dir", str(tiny_data), *QUICK, "--resume", str(loose)])
    assert code == 2 and "not inside a run's checkpoints directory; pass --output-dir NEW" in stderr
    assert sorted(path.name for path in (tmp_path / "somewhere").iterdir()) == ["step_0000008"]
    # Into a new directory it continues (and the checkpoint's own files are only read).
    run_dir, _, _ = train_here(tmp_path, tiny_data, *QUICK, "--epochs", "2", "--resume", str(loose), name="new")
    assert [m["epoch"] for m in read_metrics(run_dir)] == [2]


def test_a_refused_resume_leaves_no_new_directory_behind(finished_run, tiny_data, tmp_path):
    target = tmp_path / "a" / "b"
    _, _, stderr = train_here(tmp_path, tiny_data, *QUICK, "--lr", "0.1", "--output-dir", str(target),
                              "--resume", str(finished_run / "checkpoints" / "step_0000008"), expect=2)
    assert "follows the learning-rate schedule" in stderr
    assert not (tmp_path / "a").exists()


def test_a_checkpoints_path_that_is_a_file_is_refused_at_once(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    (run_dir / "checkpoints").write_text("not a directory")
    _, stdout, stderr = train_here(tmp_path, tiny_data, *QUICK, "--resume", "auto", expect=2)
    assert "checkpoints is a file" in stderr and "epoch 1/" not in stdout
    assert sorted(path.name for path in run_dir.iterdir()) == ["checkpoints", "config.json"]


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_writers_lock_does_not_block(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir", str(run_dir),
                              *TINY_MODEL, "--epochs", "500", "--batch-size", "32", "--resume", "auto"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=quiet_env(),
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(run_dir.glob("checkpoints/step_*/manifest.json")):
            assert time.monotonic() < deadline and first.poll() is None, "the first run never checkpointed"
            time.sleep(0.05)
        _, stdout, stderr = train_here(tmp_path, tiny_data, *TINY_MODEL, "--epochs", "500", "--batch-size", "32",
                                       "--resume", "auto", expect=2)
        assert f"--output-dir {run_dir} is in use by another run (pid {first.pid} on {socket.gethostname()}" in stderr
        assert stdout == ""
        first.send_signal(signal.SIGKILL)  # no chance to remove its lock
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    assert (run_dir / LOCK_NAME).exists()
    epochs = [m["epoch"] for m in read_metrics(run_dir)]
    assert epochs == list(range(1, len(epochs) + 1))  # one writer: no epoch twice
    _, stdout, _ = train_here(tmp_path, tiny_data, *TINY_MODEL, "--epochs", str(len(epochs) + 1), "--batch-size", "32",
                              "--resume", "auto")
    assert "resumed from" in stdout and not (run_dir / LOCK_NAME).exists()
    assert [m["epoch"] for m in read_metrics(run_dir)] == list(range(1, len(epochs) + 2))


def _write_lock(run_dir, holder, age_seconds=0.0):
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(holder) if isinstance(holder, dict) else holder)
    then = time.time() - age_seconds
    os.utime(path, (then, then))


@pytest.mark.parametrize("holder, age, taken_over", [
    ({"host": "another-node", "pid": 1, "token": "x"}, 10, False),   # heartbeat is fresh
    ({"host": "another-node", "pid": 1, "token": "x"}, run_lock.STALE_AFTER_SECONDS + 60, True),
    ("{half-written", run_lock.STALE_AFTER_SECONDS + 60, True),
    ("{half-written", 1, False),
    ("same machine, dead process", 0, True),
    ("same machine, live process", 0, False),
    # A requeued SLURM job whose rank 0 starts on another node than before: its own earlier start's lock,
    # however fresh, is taken at once; another job's fresh lock, or a later start's, is not.
    ({"host": "another-node", "pid": 1, "token": "x", "slurm_job": "42", "slurm_restart": 0}, 10, True),
    ({"host": "another-node", "pid": 1, "token": "x", "slurm_job": "41", "slurm_restart": 0}, 10, False),
    ({"host": "another-node", "pid": 1, "token": "x", "slurm_job": "42", "slurm_restart": 1}, 10, False),
])
def test_who_holds_a_lock(tmp_path, monkeypatch, holder, age, taken_over):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    mine = RunLock(tmp_path)
    if holder == "same machine, dead process":
        finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True)
        holder = {**mine.owner, "pid": int(finished.stdout), "token": "dead"}
    elif holder == "same machine, live process":
        holder = {**mine.owner, "pid": os.getppid(), "process_start": run_lock._process_start(os.getppid()),
                  "token": "alive"}
    _write_lock(tmp_path, holder, age)
    if taken_over:
        mine.acquire()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == mine.owner["token"]
        mine.release()
        assert not (tmp_path / LOCK_NAME).exists()
    else:
        with pytest.raises(UsageError, match="is in use by another run|names no run"):
            mine.acquire()
        assert (tmp_path / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_signal_after_the_last_line_still_exits_0(tiny_data, tmp_path):
    process = subprocess.Popen([sys.executable, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir",
                                str(tmp_path / "run"), *QUICK, "--max-train-samples", "64"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO, env=quiet_env(), start_new_session=True)
    try:
        for line in process.stdout:
            if "examples/sec on" in line:  # the run's last line: training and saving are done
                break
        for number in (signal.SIGTERM, signal.SIGUSR1) * 50:
            if process.poll() is not None:
                break
            try:
                process.send_signal(number)
            except ProcessLookupError:
                break
            time.sleep(0.002)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, process.stderr.read()
