"""What a run has saved is never lost or overwritten, and files anyone can edit or point at are refused
in one line: resuming from an older checkpoint, `--resume auto` into a folder that is not a run, a torn
metrics line, an edited best.json, a lock that is not a file, an unusable compile cache, a full disk."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import (REPO, TINY_MODEL, TRAIN_SCRIPT, directory_bytes, mounted_tmpfs, quiet_env, read_metrics,
                      read_weights, run_main, train_here)
from vgg_dist import evaluate
from vgg_dist.store.files import EXIT_WRITE_FAILED

# 256 training images in batches of 32: 8 steps an epoch, a checkpoint every 4 steps.
ARGS = [*TINY_MODEL, "--epochs", "2", "--batch-size", "32", "--checkpoint-every", "4", "--keep-last", "0"]


def listing(path):
    """Every entry under `path` with its kind, to show that nothing was added, removed or replaced."""
    return sorted((str(entry.relative_to(path)), entry.is_dir()) for entry in path.rglob("*"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data):
    run_dir, _, _ = train_here(tmp_path_factory.mktemp("finished"), tiny_data, *ARGS)
    return run_dir


def refused(tiny_data, *flags, main=None):
    """(stderr, exit code) of a training run given `flags`, which must be refused in one line."""
    from vgg_dist.train import main as train_main
    code, stdout, stderr = run_main(main or train_main, ["--data-dir", str(tiny_data), *ARGS, *flags])
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("error: "), (code, stdout, stderr)
    assert "epoch 1/" not in stdout
    return stderr


def test_resuming_an_older_checkpoint_of_the_same_run_is_refused_and_changes_nothing(finished_run, tiny_data):
    before, entries = directory_bytes(finished_run), listing(finished_run)
    stderr = refused(tiny_data, "--resume", str(finished_run / "checkpoints" / "step_0000004"))
    assert "has newer checkpoints (step_0000008, step_0000012, step_0000016)" in stderr
    assert "--resume auto" in stderr and "new --output-dir" in stderr
    assert directory_bytes(finished_run) == before and listing(finished_run) == entries


def test_an_older_checkpoint_branches_into_a_new_directory_and_ends_where_the_run_ended(finished_run, tiny_data,
                                                                                          tmp_path):
    before = directory_bytes(finished_run)
    branch, stdout, _ = train_here(tmp_path, tiny_data, *ARGS, "--resume",
                                   str(finished_run / "checkpoints" / "step_0000004"), name="branch")
    assert "resumed from" in stdout and directory_bytes(finished_run) == before
    ours, theirs = read_weights(branch), read_weights(finished_run)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)  # the same steps, bitwise
    final = json.loads((branch / "config.json").read_text())["final_metrics"]
    assert final["epoch"] == 2 and final["test_acc"] == read_metrics(finished_run)[-1]["test_acc"]


@pytest.mark.parametrize("names", [["notes.txt", "model.safetensors", "report.json"],
                                   ["model.safetensors", "report.json"]])
def test_resume_auto_refuses_a_folder_that_is_not_a_run(tiny_data, tmp_path, names):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in names:
        (folder / name).write_text(f"the user's own {name}")
    before = directory_bytes(folder)
    stderr = refused(tiny_data, "--output-dir", str(folder), "--resume", "auto")
    assert f"--output-dir {folder} holds '{names[0]}'" in stderr and "choose a new one" in stderr
    assert directory_bytes(folder) == before and listing(folder) == sorted((name, False) for name in names)


def test_no_run_is_written_inside_a_checkpoint(finished_run, tiny_data, tmp_path):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    before, entries = directory_bytes(run_dir), listing(run_dir)
    for flags in (["--resume", "auto"], []):
        stderr = refused(tiny_data, "--output-dir", str(run_dir / "checkpoints" / "step_0000016"), *flags)
        assert f"is inside the checkpoints of run {run_dir.resolve()}" in stderr
    stderr = refused(tiny_data, "--output-dir", str(run_dir / "checkpoints" / "new"))
    assert "is inside the checkpoints of run" in stderr
    assert directory_bytes(run_dir) == before and listing(run_dir) == entries


def _stopped_after_epoch_one(finished_run, destination):
    """The run as a crash during epoch 2 leaves it: epoch 1 checkpointed, epoch 2's record on file."""
    run_dir = shutil.copytree(finished_run, destination)
    (run_dir / "model.safetensors").unlink()
    for step in ("step_0000012", "step_0000016"):
        shutil.rmtree(run_dir / "checkpoints" / step)
    return run_dir


def test_a_torn_last_metrics_line_is_dropped_with_a_notice(finished_run, tiny_data, tmp_path):
    run_dir = _stopped_after_epoch_one(finished_run, tmp_path / "run")
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text[:len(text) - len(text.splitlines()[-1]) // 2 - 1])  # half the last line, no newline
    _, stdout, _ = train_here(tmp_path, tiny_data, *ARGS, "--resume", "auto", name="run")
    assert f"dropped the torn last line of {metrics}" in stdout
    assert [record["epoch"] for record in read_metrics(run_dir)] == [1, 2]
    assert read_metrics(run_dir) == read_metrics(finished_run) or [  # the same run, again: the same records
        {key: value for key, value in record.items() if "sec" not in key} for record in read_metrics(run_dir)] == [
        {key: value for key, value in record.items() if "sec" not in key} for record in read_metrics(finished_run)]


def test_a_damaged_metrics_line_before_the_last_is_refused_before_any_file_changes(finished_run, tiny_data,
                                                                                   tmp_path):
    run_dir = _stopped_after_epoch_one(finished_run, tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0][:20], *lines[1:]]) + "\n")
    before, entries = directory_bytes(run_dir), listing(run_dir)
    stderr = refused(tiny_data, "--output-dir", str(run_dir), "--resume", "auto")
    assert f"{run_dir / 'metrics.jsonl'}: line 1 is not" in stderr
    assert directory_bytes(run_dir) == before and listing(run_dir) == entries  # config.json included


@pytest.mark.parametrize("make", [os.mkfifo, lambda path: path.symlink_to(path.parent.parent / "elsewhere.jsonl")],
                         ids=["fifo", "link out of the run"])
def test_a_metrics_file_that_is_not_a_plain_file_is_refused_before_anything_is_read_or_appended(
        finished_run, tiny_data, tmp_path, make):
    """A FIFO would block the resume for ever; a link would send the new records outside the run."""
    run_dir = _stopped_after_epoch_one(finished_run, tmp_path / "run")
    (tmp_path / "elsewhere.jsonl").write_text("")
    (run_dir / "metrics.jsonl").unlink()
    make(run_dir / "metrics.jsonl")
    before, entries = directory_bytes(run_dir), listing(run_dir)
    stderr = refused(tiny_data, "--output-dir", str(run_dir), "--resume", "auto")
    assert f"{run_dir / 'metrics.jsonl'}: not a regular file" in stderr
    assert directory_bytes(run_dir) == before and listing(run_dir) == entries
    assert (tmp_path / "elsewhere.jsonl").read_text() == ""


def test_a_run_directory_passed_to_resume_says_how_to_continue_it(finished_run, tiny_data):
    stderr = refused(tiny_data, "--resume", str(finished_run))
    assert f"--resume {finished_run} is a run directory; continue it with --resume auto --output-dir" in stderr


def test_evaluate_names_what_is_missing_in_a_stopped_run_and_behind_best_json(finished_run, tmp_path):
    run_dir = shutil.copytree(finished_run, tmp_path / "run", ignore=shutil.ignore_patterns("tensorboard"))
    (run_dir / "model.safetensors").unlink()
    code, _, stderr = run_main(evaluate.main, ["--checkpoint", str(run_dir)])
    assert code == 2 and "no model.safetensors, which a run writes when it finishes" in stderr, stderr
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())["checkpoint"]
    shutil.rmtree(run_dir / "checkpoints" / best)
    code, _, stderr = run_main(evaluate.main, ["--checkpoint", str(run_dir / "checkpoints" / "best")])
    assert code == 2 and f"best.json names {best}, which is gone" in stderr, stderr


def test_a_symlinked_checkpoint_is_neither_resumed_nor_rotated(finished_run, tmp_path):
    from vgg_dist.store import checkpoint
    run_dir = shutil.copytree(finished_run, tmp_path / "run", ignore=shutil.ignore_patterns("tensorboard"))
    outside = shutil.copytree(run_dir / "checkpoints" / "step_0000016", tmp_path / "kept")
    (run_dir / "checkpoints" / "step_0000001").symlink_to(outside)  # older than all: rotation reaches it
    assert all(not path.is_symlink() for path in checkpoint.list_checkpoints(run_dir / "checkpoints"))
    checkpoint.rotate(run_dir / "checkpoints", keep_last=1)
    assert (outside / "manifest.json").is_file()


@pytest.mark.parametrize("pointer", [{"checkpoint": 5}, {"checkpoint": "../../other"}, ["step_0000004"],
                                     {"checkpoint": "step_0000004/../../x"}])
def test_an_edited_best_json_is_refused_in_one_line(finished_run, tmp_path, pointer):
    run_dir = shutil.copytree(finished_run, tmp_path / "run", ignore=shutil.ignore_patterns("tensorboard"))
    (run_dir / "checkpoints" / "best.json").write_text(json.dumps(pointer))
    code, stdout, stderr = run_main(evaluate.main, ["--checkpoint", str(run_dir / "checkpoints" / "best")])
    assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
    assert "no valid best.json" in stderr and "it must name a step_N checkpoint there" in stderr


@pytest.mark.parametrize("kind", ["fifo behind a symlink", "directory", "symlink"])
def test_a_lock_that_is_not_a_file_is_refused_in_one_line(finished_run, tiny_data, tmp_path, kind):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    lock = run_dir / ".vgg_dist.lock"
    if kind == "fifo behind a symlink":
        os.mkfifo(tmp_path / "fifo")
        lock.symlink_to(tmp_path / "fifo")
        expected = "is a symbolic link, not a vgg_dist lock file"
    elif kind == "directory":
        lock.mkdir()
        expected = "is a directory, not a vgg_dist lock file"
    else:
        lock.symlink_to(tmp_path / "elsewhere")
        expected = "is a symbolic link, not a vgg_dist lock file"
    before = directory_bytes(run_dir)
    stderr = refused(tiny_data, "--output-dir", str(run_dir), "--resume", "auto")  # a FIFO opened plainly hangs
    assert f"{lock} {expected}" in stderr and "None" not in stderr
    assert directory_bytes(run_dir) == before


def test_a_fifo_lock_is_refused_without_blocking(finished_run, tiny_data, tmp_path):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    os.mkfifo(run_dir / ".vgg_dist.lock")
    stderr = refused(tiny_data, "--output-dir", str(run_dir), "--resume", "auto")
    assert f"{run_dir / '.vgg_dist.lock'} is a FIFO, not a vgg_dist lock file" in stderr


@pytest.mark.slow
def test_an_unusable_compile_cache_matters_only_to_a_compiled_run(tiny_data, tmp_path):
    env = quiet_env(TORCHINDUCTOR_CACHE_DIR="/proc/x")
    base = [sys.executable, TRAIN_SCRIPT, "--data-dir", str(tiny_data), *TINY_MODEL, "--epochs", "1",
            "--batch-size", "32", "--max-train-samples", "64", "--max-eval-samples", "32"]
    eager = subprocess.run([*base, "--output-dir", str(tmp_path / "eager")], capture_output=True, text=True,
                           env=env, cwd=REPO, timeout=180)
    assert eager.returncode == 0 and "Traceback" not in eager.stderr, eager.stderr
    compiled = subprocess.run([*base, "--output-dir", str(tmp_path / "compiled"), "--compile"], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=180)
    assert compiled.returncode == 2 and compiled.stderr.count("\n") == 1, compiled.stderr
    assert "the torch.compile cache /proc/x cannot be used" in compiled.stderr
    assert "TORCHINDUCTOR_CACHE_DIR" in compiled.stderr and not (tmp_path / "compiled").exists()


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "6m") as mount:
        yield mount


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_line_and_loses_nothing(tiny_data, small_disk, tmp_path):
    # About 1.2 MiB of weights; with the optimizer's momentum a checkpoint is about 2.4 MiB, so the disk
    # holds the run's files and the first checkpoint, and the second does not fit.
    flags = [*ARGS, "--momentum", "0.9", "--hidden-size", "512"]
    run_dir = small_disk / "run"
    command = [sys.executable, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir", str(run_dir), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=quiet_env(), cwd=REPO, timeout=180)
    assert result.returncode == EXIT_WRITE_FAILED, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"no space left on the device holding {run_dir / 'checkpoints'}" in result.stderr
    assert "MiB are free" in result.stderr and "rerun with --resume auto" in result.stderr
    saved = sorted(path.name for path in (run_dir / "checkpoints").iterdir() if not path.name.startswith("."))
    assert saved and not (run_dir / ".vgg_dist.lock").exists()
    for name in saved:
        assert load_file(run_dir / "checkpoints" / name / "model.safetensors")  # intact, complete
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the partial save was taken back


@pytest.mark.slow
def test_a_disk_that_is_full_before_the_first_run_file_is_one_line_too(tiny_data, small_disk):
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 4096))  # one page left: the lock takes it, config.json finds none
    run_dir = small_disk / "run"
    command = [sys.executable, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir", str(run_dir), *ARGS]
    result = subprocess.run(command, capture_output=True, text=True, env=quiet_env(), cwd=REPO, timeout=180)
    assert result.returncode == EXIT_WRITE_FAILED, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"no space left on the device holding {run_dir}: writing " in result.stderr
    assert not (run_dir / ".vgg_dist.lock").exists() and not list(run_dir.glob(".*.tmp"))


@pytest.mark.parametrize("pointer", ['{"checkpoint": "step_00000', "[1, 2]", '{"checkpoint": "../../r1/step_0000004"}'])
def test_an_unreadable_best_json_is_refused_on_resume_and_never_costs_the_best_checkpoint(finished_run, tiny_data,
                                                                                           tmp_path, pointer):
    from vgg_dist.store import checkpoint
    run_dir = _stopped_after_epoch_one(finished_run, tmp_path / "run")
    (run_dir / "checkpoints" / "best.json").write_text(pointer)
    before, entries = directory_bytes(run_dir), listing(run_dir)
    stderr = refused(tiny_data, "--output-dir", str(run_dir), "--resume", "auto")
    assert f"{run_dir / 'checkpoints' / 'best.json'}: does not name a step_N checkpoint" in stderr
    assert directory_bytes(run_dir) == before and listing(run_dir) == entries
    checkpoint.rotate(run_dir / "checkpoints", keep_last=1)  # and rotation alone deletes nothing either
    assert listing(run_dir) == entries


def test_no_run_is_written_inside_another_run(finished_run, tiny_data, tmp_path):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    before = listing(run_dir)
    stderr = refused(tiny_data, "--output-dir", str(run_dir / "sub"))
    assert f"--output-dir {run_dir / 'sub'} is inside the run {run_dir}" in stderr
    assert listing(run_dir) == before


def test_a_compile_cache_inside_the_run_directory_is_left_alone_by_a_refusal_and_kept_by_a_resume(
        finished_run, tiny_data, tmp_path, monkeypatch):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(occupied / "cache"))
    refused(tiny_data, "--output-dir", str(occupied))
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]  # the refused run created nothing
    run_dir = _stopped_after_epoch_one(finished_run, tmp_path / "run")
    (run_dir / "cache").mkdir()  # what the compiler makes on import
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(run_dir / "cache"))
    _, stdout, _ = train_here(tmp_path, tiny_data, *ARGS, "--resume", "auto", name="run")
    assert "resumed from" in stdout
