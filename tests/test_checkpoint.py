"""Checkpoints: exact resume, preemption, crashes mid-save, and refusing bad or tampered checkpoints.

The uninterrupted run below is the reference: every interrupted-and-resumed run must end with the
same bits. 2 processes, 2 epochs of 16 steps, checkpoints every 5 steps and at every epoch end, with
every training feature on: SyncBatchNorm, augmentation, a warm-up + cosine schedule, Nesterov SGD
with weight decay, label smoothing, gradient clipping, weight EMA and dropout.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (REPO, TRAIN_SCRIPT, directory_bytes, launch_command, quiet_env, read_metrics, read_weights,
                      run_bounded, saved_state, stopped_copy, tiny_checkpoint, train, train_here)
from vgg_dist.config import parse_config
from vgg_dist.errors import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USAGE
from vgg_dist.model import build_model
from vgg_dist.store import checkpoint
from vgg_dist.store.checkpoint import RunIdentity
from vgg_dist.training.optim import make_sgd
from vgg_dist.training.setup import make_schedule

STEPS_PER_EPOCH = 16
MODEL = ["--image-size", "32", "--width-divisor", "16", "--hidden-size", "128"]
FEATURES = ["--batch-norm", "--momentum", "0.9", "--nesterov", "--weight-decay", "5e-4", "--lr-schedule", "cosine",
            "--warmup-epochs", "1", "--label-smoothing", "0.1", "--clip-grad-norm", "5", "--random-crop-padding", "2",
            "--hflip", "0.5", "--random-erase", "0.5", "--model-ema"]
ARGS = [*MODEL, *FEATURES, "--epochs", "2", "--batch-size", "16", "--checkpoint-every", "5", "--keep-last", "0",
        "--sync-every", "1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    run_dir, _ = train(tmp_path_factory.mktemp("reference"), tiny_data, *ARGS, num_processes=2)
    return run_dir


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_data):
    """The reference's flags on one process, trained in this process: the checkpoints that the refusal
    tests damage, seconds cheaper than a launched run."""
    run_dir, _, _ = train_here(tmp_path_factory.mktemp("one_process"), tiny_data, *ARGS)
    return run_dir


def final_checkpoint(run_dir):
    return checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]


def assert_same_bits(run_dir, reference_dir):
    ours, theirs = read_weights(run_dir), read_weights(reference_dir)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    ours_ckpt, theirs_ckpt = final_checkpoint(run_dir), final_checkpoint(reference_dir)
    assert ours_ckpt.name == theirs_ckpt.name
    for file in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        mine, reference = load_file(ours_ckpt / file), load_file(theirs_ckpt / file)
        assert mine and mine.keys() == reference.keys()  # momentum buffers exist
        for name in mine:
            assert torch.equal(mine[name], reference[name]), (file, name)


def resume(run_dir, tiny_data, num_processes=2, extra=()):
    command = launch_command(num_processes, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir",
                             str(run_dir), *ARGS, *extra, "--resume", "auto")
    result = run_bounded(command, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_epoch_boundary_resume_is_bitwise_identical(reference, tiny_data, tmp_path):
    run_dir = stopped_copy(reference, tmp_path / "run", last_step=STEPS_PER_EPOCH)
    state = saved_state(run_dir / "checkpoints" / "step_0000016")
    assert state["progress"]["epoch"] == 1 and state["progress"]["step_in_epoch"] == 0
    resume(run_dir, tiny_data)
    assert_same_bits(run_dir, reference)


def _crash_during_save(checkpoints_dir, step):
    """Start a real save in another process and kill it (os._exit) after it wrote part of a file."""
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO / "tests")!r})
        from conftest import tiny_checkpoint
        from vgg_dist.store import checkpoint, files
        real = files.save_file
        def dying_save(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
            os._exit(9)
        files.save_file = dying_save
        checkpoint.write(Path({str(checkpoints_dir)!r}), *tiny_checkpoint({step}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60, capture_output=True)
    assert result.returncode == 9, result.stderr


@pytest.mark.slow
def test_mid_epoch_resume_past_a_crashed_and_an_uncommitted_save_is_bitwise_identical(reference, tiny_data, tmp_path):
    run_dir = stopped_copy(reference, tmp_path / "run", last_step=25)
    (run_dir / "checkpoints" / "step_0000025" / "manifest.json").unlink()  # a save that never committed
    _crash_during_save(run_dir / "checkpoints", step=28)  # and one that died half-way
    assert list((run_dir / "checkpoints").glob(".tmp-*")) and not (run_dir / "checkpoints" / "step_0000028").exists()
    result = resume(run_dir, tiny_data)
    assert "skipping" in result.stdout and "step_0000025: incomplete checkpoint" in result.stdout
    assert "resumed from" in result.stdout and "step_0000020" in result.stdout
    assert "interrupted save" in result.stdout and not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert_same_bits(run_dir, reference)
    # Step 20 is mid-epoch (epoch 2, step 4 of 16): the epoch's partial sums and the schedule continue too.
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]  # no epoch repeated in the log
    assert [m["train_loss"] for m in read_metrics(run_dir)] == [m["train_loss"] for m in read_metrics(reference)]
    assert [m["lr"] for m in read_metrics(run_dir)] == [m["lr"] for m in read_metrics(reference)]


def _worker(rank: int, timeout: float = 60) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            try:
                if TRAIN_SCRIPT in (process.info["cmdline"] or []) and process.environ().get("RANK") == str(rank):
                    return process
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.05)
    pytest.fail(f"no training process with RANK={rank} appeared")


def reported_exit_codes(launcher_stderr: str) -> set[int]:
    """The worker exit codes torchrun reports. It lists the ranks that had exited when it noticed the
    first failure, so a rank still on its way out may be missing; none may show another code."""
    return {int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", launcher_stderr)}


def _signal_after_first_checkpoint(process, run_dir, rank, number):
    """Signal one rank once step 5 is checkpointed; return the launcher's output and how long both
    workers took to exit."""
    try:
        workers = [_worker(0), _worker(1)]
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "step_0000005" / "manifest.json").exists():
            assert time.monotonic() < deadline and process.poll() is None, "run never reached step 5"
            time.sleep(0.01)
        workers[rank].send_signal(number)
        signalled = time.monotonic()
        gone, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, "a worker outlived the stop request"
        seconds = time.monotonic() - signalled
        stdout, stderr = process.communicate(timeout=60)
        return stdout, stderr, seconds
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_with_a_checkpoint_and_resume_matches(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    command = launch_command(2, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir", str(run_dir), *ARGS)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=quiet_env(), start_new_session=True)
    stdout, stderr, seconds = _signal_after_first_checkpoint(process, run_dir, rank=1, number=signal.SIGTERM)
    assert process.returncode != 0
    assert seconds < 20  # both workers
    assert reported_exit_codes(stderr) == {EXIT_PREEMPTED}, stderr
    assert "rerun with --resume auto" in stderr
    newest = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    checkpoint.verify(newest)
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / ".vgg_dist.lock").exists()
    resume(run_dir, tiny_data)
    assert_same_bits(run_dir, reference)


@pytest.mark.slow
def test_sigusr1_under_slurm_checkpoints_and_requeues_once(tiny_data, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = quiet_env(SLURM_JOB_ID="4242", PATH=f"{bin_dir}:{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    command = launch_command(2, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir", str(run_dir), *MODEL,
                             "--epochs", "2", "--batch-size", "16", "--checkpoint-every", "5", "--sync-every", "1",
                             "--requeue")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=env, start_new_session=True)
    stdout, stderr, seconds = _signal_after_first_checkpoint(process, run_dir, rank=0, number=signal.SIGUSR1)
    assert seconds < 20 and reported_exit_codes(stderr) == {EXIT_PREEMPTED}, stderr
    assert calls.read_text().splitlines() == ["requeue 4242"]
    checkpoint.verify(checkpoint.list_checkpoints(run_dir / "checkpoints")[-1])


def _tiny_save(checkpoints_dir, step):
    return checkpoint.write(checkpoints_dir, *tiny_checkpoint(step))


def test_rotation_only_after_commit_even_when_the_third_save_crashes(tmp_path):
    checkpoints_dir = tmp_path / "checkpoints"
    for step in (1, 2):
        _tiny_save(checkpoints_dir, step)
        checkpoint.rotate(checkpoints_dir, keep_last=2)
    _crash_during_save(checkpoints_dir, step=3)
    complete = [path.name for path in checkpoint.list_checkpoints(checkpoints_dir) if (path / "manifest.json").exists()]
    assert complete == ["step_0000001", "step_0000002"]
    for path in checkpoint.list_checkpoints(checkpoints_dir):
        checkpoint.verify(path)
    _tiny_save(checkpoints_dir, 3)
    checkpoint.rotate(checkpoints_dir, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(checkpoints_dir)] == ["step_0000002", "step_0000003"]


def test_rotation_keeps_the_best(tmp_path):
    checkpoints_dir = tmp_path / "checkpoints"
    best = _tiny_save(checkpoints_dir, 1)
    checkpoint.mark_best(checkpoints_dir, best, "test_acc", 0.9)
    for step in (2, 3, 4):
        _tiny_save(checkpoints_dir, step)
        checkpoint.rotate(checkpoints_dir, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(checkpoints_dir)] == ["step_0000001", "step_0000003",
                                                                            "step_0000004"]


def test_optimizer_state_round_trips_without_pickle():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    structure, tensors = checkpoint.split_tensors(optimizer.state_dict())
    json.dumps(structure)  # everything but the tensors is plain JSON
    restored = checkpoint.join_tensors(json.loads(json.dumps(structure)), tensors)
    fresh = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(restored)
    assert fresh.param_groups[0]["momentum"] == 0.9
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])


def test_resuming_at_the_very_end_of_an_epoch_reports_no_speed_for_it(tiny_data, tmp_path):
    args = [*MODEL, "--epochs", "2", "--batch-size", "32", "--checkpoint-every", "8", "--no-checkpoint-epochs",
            "--keep-last", "0"]
    run_dir, _, _ = train_here(tmp_path, tiny_data, *args)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000016")
    state = saved_state(run_dir / "checkpoints" / "step_0000008")
    assert state["progress"] == {"epoch": 0, "step_in_epoch": 8, "global_step": 8, "best_acc": None}
    train_here(tmp_path, tiny_data, *args, "--resume", "auto")
    first, second = read_metrics(run_dir)
    assert first["examples_per_sec"] is None and first["train_samples"] == 256
    assert second["examples_per_sec"] > 0


@pytest.mark.slow
def test_nonfinite_loss_stops_all_ranks_and_is_never_checkpointed(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    command = launch_command(2, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir", str(run_dir), *MODEL,
                             "--batch-size", "16", "--lr", "1e6", "--checkpoint-every", "1", "--sync-every", "1")
    result = run_bounded(command, timeout=120)
    assert result.returncode != 0
    assert reported_exit_codes(result.stderr) == {EXIT_DIVERGED}, result.stderr
    assert "error: non-finite loss or weights at step" in result.stderr
    bad_step = int(result.stderr.split("at step ")[1].split()[0])
    saved = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert all(int(path.name.split("_")[1]) < bad_step for path in saved)
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


# ---- Refusing checkpoints: every check runs before anything changes ---------------------------------

def _rewrite_manifest(path):
    """Make the manifest agree with what is on disk, so a later check (not the hash) has to catch it."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {name: {"bytes": (path / name).stat().st_size, "sha256": checkpoint._sha256(path / name, (path / name).stat().st_size)}
                         for name in sorted(p.name for p in path.iterdir() if p.name != "manifest.json")}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _edit_state(change):
    def damage(path, sentinel):
        state = json.loads((path / "state.json").read_text())
        change(state)
        (path / "state.json").write_text(json.dumps(state))
        _rewrite_manifest(path)
    return damage


def _edit_manifest(change):
    def damage(path, sentinel):
        manifest = json.loads((path / "manifest.json").read_text())
        change(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
    return damage


def _replace_file(name, make):
    def damage(path, sentinel):
        (path / name).unlink()
        make(path / name)
    return damage


class _Sentinel:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant_pickle(path, sentinel):
    torch.save({"0.0.weight": _Sentinel(str(sentinel))}, path / "model.safetensors")
    _rewrite_manifest(path)


def _empty_rng_file(path, sentinel):
    save_file({}, path / "rng.safetensors", metadata={"vgg_dist.file": "rng.safetensors"})
    _rewrite_manifest(path)


def _misshape_momentum(path, sentinel):
    tensors = load_file(path / "optimizer.safetensors")
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3)
    save_file(tensors, path / "optimizer.safetensors", metadata={"vgg_dist.file": "optimizer.safetensors"})
    _rewrite_manifest(path)


def _set_group_setting(state, key, value):
    """Set `key` in every parameter group of state.json's optimizer (stored as {"dict": [[key, node]...]})."""
    groups = dict(state["optimizer"]["dict"])["param_groups"]["list"]
    for group in groups:
        dict(group["dict"])[key]["value"] = value


def _at_epoch(epoch):
    """A state edited to the start of `epoch`, consistent in itself (not with the manifest's step)."""
    def change(state):
        state["progress"].update(epoch=epoch, step_in_epoch=0, global_step=epoch * STEPS_PER_EPOCH)
    return change


BAD_CHECKPOINTS = {
    "truncated": (lambda p, s: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-100]),
                  "truncated or appended to"),
    "emptied": (lambda p, s: (p / "model.safetensors").write_bytes(b""), "truncated or appended to"),
    "bytes appended": (lambda p, s: open(p / "model.safetensors", "ab").write(b"extra"), "truncated or appended to"),
    "manifest mismatch": (lambda p, s: (p / "optimizer.safetensors").write_bytes(
        (p / "optimizer.safetensors").read_bytes()[:-4] + b"\0\0\0\1"), "do not match the manifest's SHA-256"),
    "missing file": (lambda p, s: (p / "rng.safetensors").unlink(), "missing ['rng.safetensors']"),
    "pickle renamed": (_plant_pickle, "not a valid safetensors file"),
    "truncated and manifest rewritten": (lambda p, s: ((p / "model.safetensors").write_bytes(
        (p / "model.safetensors").read_bytes()[:5000]), _rewrite_manifest(p)), "not a valid safetensors file"),
    "manifest files a list": (_edit_manifest(lambda m: m.update(files=list(m["files"]))),
                              "manifest.json: files must be a mapping with text keys"),
    "manifest entry without bytes": (_edit_manifest(lambda m: m["files"]["state.json"].pop("bytes")),
                                     "manifest.json: files.state.json: missing field 'bytes'"),
    "link to /dev/zero": (_replace_file("rng.safetensors", lambda p: p.symlink_to("/dev/zero")), "not a regular file"),
    "fifo": (_replace_file("rng.safetensors", os.mkfifo), "not a regular file"),
    "epoch -1": (_edit_state(lambda s: s["progress"].update(epoch=-1)), "progress.epoch must be a whole number"),
    "epoch as text": (_edit_state(lambda s: s["progress"].update(epoch="1")), "state.json: progress.epoch must be int"),
    "epoch 50": (_edit_state(lambda s: s["progress"].update(epoch=50)), "progress.global_step 20 is not epoch 50"),
    "epoch 50, consistent": (_edit_state(_at_epoch(50)), "past the end of a 2-epoch run"),
    "step 100 of an epoch": (_edit_state(lambda s: s["progress"].update(step_in_epoch=100)), "beyond the 16 steps"),
    "no optimizer": (_edit_state(lambda s: s.pop("optimizer")), "state.json: missing field 'optimizer'"),
    "optimizer of another shape": (_edit_state(lambda s: s.update(optimizer={"state": {}})),
                                   "optimizer state does not fit"),
    "optimizer tensor misshapen": (_misshape_momentum, "optimizer state does not fit"),
    "python rng garbage": (_edit_state(lambda s: s["rng"][0].update(python=[3, [1, 2], None])),
                           "random generator state of rank 0 is unusable"),
    "rng file without tensors": (_empty_rng_file, "random generator state of rank 0 is unusable"),
    "partial sums cut": (_edit_state(lambda s: s.update(partial_epoch_totals=[1.0, 2.0])),
                         "state.json: partial_epoch_totals must be a mapping"),
    "partial sums not finite": (_edit_state(lambda s: s["partial_epoch_totals"].update(loss=float("nan"))),
                                "partial_epoch_totals.loss must be a finite number"),
    "world size 0": (_edit_state(lambda s: s.update(world_size=0)), "world_size must be a positive integer"),
    "progress of another step than the manifest's": (_edit_state(lambda s: (_at_epoch(1)(s), s.update(
        partial_epoch_totals={"loss": 0.0, "correct": 0.0, "samples": 0.0}))), "is not the manifest's 20"),
    "momentum edited": (_edit_state(lambda s: _set_group_setting(s, "momentum", 0.99)),
                        "group 0 has momentum 0.99, this run 0.9"),
    "manifest nested beyond what JSON parses": (lambda p, s: (p / "manifest.json").write_text("[" * 100_000),
                                                "manifest.json: not readable JSON"),
    "negative partial loss": (_edit_state(lambda s: s["partial_epoch_totals"].update(loss=-1.0)),
                              "partial_epoch_totals need a loss and a correct count of at least 0"),
}


def read_checkpoint(path, *flags, num_classes=10):
    """checkpoint.read as the trainer calls it, for a run with ARGS and `flags`."""
    config = parse_config([*ARGS, *flags], prog="train", description="test")
    spec = config.model_spec(in_channels=1, num_classes=num_classes)
    model = build_model(spec)
    optimizer = make_sgd(model, config.lr, config.momentum, config.nesterov, config.weight_decay, fused=False)
    identity = RunIdentity(spec=spec, config=config, schedule=make_schedule(config, STEPS_PER_EPOCH),
                           steps_per_epoch=STEPS_PER_EPOCH)
    return checkpoint.read(path, identity, model, optimizer)


def test_an_untouched_checkpoint_is_accepted(one_process_run):
    restored = read_checkpoint(one_process_run / "checkpoints" / "step_0000020")
    assert restored["progress"].global_step == 20 and restored["ema"] is not None


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_with_one_line_and_nothing_changes(one_process_run, tmp_path, case):
    damage, message = BAD_CHECKPOINTS[case]
    target = shutil.copytree(one_process_run / "checkpoints" / "step_0000020", tmp_path / "step_0000020")
    sentinel = tmp_path / "pickle-ran"
    damage(target, sentinel)
    before = {path.name: path.lstat().st_size for path in target.iterdir()}
    with pytest.raises(checkpoint.CheckpointError) as caught:
        read_checkpoint(target)
    assert message in str(caught.value) and str(target) in str(caught.value) and "\n" not in str(caught.value)
    assert {path.name: path.lstat().st_size for path in target.iterdir()} == before
    assert not sentinel.exists()


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "64"], "holds a different model (image_size 32 here 64)"),
    (["--arch", "vgg13"], "holds a different model (arch vgg11 here vgg13)"),
    (["--batch-size", "32"], "was trained with --batch-size 16, not 32"),
    (["--lr", "0.1"], "follows the learning-rate schedule"),
    (["--no-model-ema"], "was trained with --model-ema; resume with it"),
    (["--momentum", "0.5"], "was trained with --momentum 0.9, not 0.5; the optimizer's settings come from the "
                            "checkpoint"),
    (["--weight-decay", "0.001"], "was trained with --weight-decay 0.0005, not 0.001"),
    (["--optimizer", "adamw"], "was trained with --optimizer sgd, not adamw"),
])
def test_checkpoint_of_another_run_is_refused(one_process_run, flags, message):
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(message)):
        read_checkpoint(one_process_run / "checkpoints" / "step_0000020", *flags)


def test_a_dataset_with_other_classes_is_refused(one_process_run):
    with pytest.raises(checkpoint.CheckpointError, match="num_classes 10 here 7"):
        read_checkpoint(one_process_run / "checkpoints" / "step_0000020", num_classes=7)


def test_a_checkpoint_renamed_to_another_step_is_refused(one_process_run, tmp_path):
    renamed = shutil.copytree(one_process_run / "checkpoints" / "step_0000020", tmp_path / "step_0000999")
    with pytest.raises(checkpoint.CheckpointError, match="its manifest is of global step 20; a checkpoint keeps the "
                                                         "name step_0000020"):
        checkpoint.verify(renamed)


def test_a_checkpoint_of_a_hub_run_outside_its_run_says_where_its_class_names_are(one_process_run, tmp_path):
    from vgg_dist.errors import UsageError
    from vgg_dist.store.artifacts import resolve_weights
    loose = shutil.copytree(one_process_run / "checkpoints" / "step_0000020", tmp_path / "step_0000020")
    _edit_state(lambda s: s["flags"].update(dataset="someone/pets"))(loose, None)
    with pytest.raises(UsageError, match="a checkpoint of a someone/pets run outside its run directory"):
        resolve_weights(loose)


@pytest.mark.slow
def test_a_tampered_checkpoint_leaves_the_run_directory_byte_for_byte(reference, tiny_data, tmp_path):
    run_dir = stopped_copy(reference, tmp_path / "run", last_step=20)
    target = run_dir / "checkpoints" / "step_0000020"
    _edit_state(_at_epoch(50))(target, None)
    before = directory_bytes(run_dir)
    result = run_bounded([sys.executable, TRAIN_SCRIPT, "--data-dir", str(tiny_data), *ARGS,
                          "--resume", str(target), "--output-dir", str(run_dir)], timeout=120)
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "past the end of a 2-epoch run" in result.stderr
    assert "epoch 1/" not in result.stdout  # refused before any training
    assert directory_bytes(run_dir) == before
