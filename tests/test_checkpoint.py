"""Checkpoints: exact resume, preemption, crashes mid-save, and refusing bad checkpoints.

The uninterrupted run below is the reference: every interrupted-and-resumed run must end with the
same bits. 2 processes, 3 epochs of 16 steps, checkpoints every 5 steps and at every epoch end.
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
from safetensors.torch import load_file

from conftest import REPO, TRAIN_SCRIPT, launch_command, quiet_env, read_metrics, read_weights, run_bounded, train
from vgg_dist import checkpoint
from vgg_dist.errors import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USAGE

STEPS_PER_EPOCH = 16
ARGS = ["--image-size", "64", "--width-divisor", "16", "--hidden-size", "128", "--epochs", "3",
        "--batch-size", "16", "--momentum", "0.9", "--checkpoint-every", "5", "--keep-last", "0",
        "--sync-every", "1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    run_dir, _ = train(tmp_path_factory.mktemp("reference"), tiny_data, *ARGS, num_processes=2)
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
    optimizer_ours = load_file(ours_ckpt / "optimizer.safetensors")
    optimizer_theirs = load_file(theirs_ckpt / "optimizer.safetensors")
    assert optimizer_ours and optimizer_ours.keys() == optimizer_theirs.keys()  # momentum buffers exist
    for name in optimizer_ours:
        assert torch.equal(optimizer_ours[name], optimizer_theirs[name]), name


def stopped_copy(reference_dir, destination, last_step):
    """The run directory as a crash right after checkpoint `last_step` would have left it: later
    checkpoints and the final model gone, metrics possibly ahead of the checkpoint."""
    shutil.copytree(reference_dir, destination)
    (destination / "model.safetensors").unlink()
    for path in checkpoint.list_checkpoints(destination / "checkpoints"):
        if int(path.name.split("_")[1]) > last_step:
            shutil.rmtree(path)
    return destination


def resume(run_dir, tiny_data, num_processes=2, extra=(), check=True):
    command = launch_command(num_processes, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir",
                             str(run_dir), *ARGS, *extra, "--resume", "auto")
    result = run_bounded(command, timeout=180)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_mid_epoch_resume_is_bitwise_identical(reference, tiny_data, tmp_path):
    run_dir = stopped_copy(reference, tmp_path / "run", last_step=20)  # epoch 2, step 4 of 16
    result = resume(run_dir, tiny_data)
    assert "resumed from" in result.stdout and "step_0000020" in result.stdout
    assert_same_bits(run_dir, reference)
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]  # no epoch repeated in the log
    assert [m["train_loss"] for m in read_metrics(run_dir)] == [m["train_loss"] for m in read_metrics(reference)]


def test_epoch_boundary_resume_is_bitwise_identical(reference, tiny_data, tmp_path):
    run_dir = stopped_copy(reference, tmp_path / "run", last_step=2 * STEPS_PER_EPOCH)
    state = checkpoint.read_state(run_dir / "checkpoints" / "step_0000032")
    assert state["progress"]["epoch"] == 2 and state["progress"]["step_in_epoch"] == 0
    resume(run_dir, tiny_data)
    assert_same_bits(run_dir, reference)


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


def _start(run_dir, tiny_data, env=None):
    command = launch_command(2, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir", str(run_dir), *ARGS)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env or quiet_env(), start_new_session=True)


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


def test_sigterm_to_one_rank_stops_both_with_a_checkpoint_and_resume_matches(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    process = _start(run_dir, tiny_data)
    stdout, stderr, seconds = _signal_after_first_checkpoint(process, run_dir, rank=1, number=signal.SIGTERM)
    assert process.returncode != 0
    assert seconds < 20  # both workers
    assert reported_exit_codes(stderr) == {EXIT_PREEMPTED}, stderr
    assert "rerun with --resume auto" in stderr
    newest = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    checkpoint.verify(newest)
    assert not (run_dir / "model.safetensors").exists()
    resume(run_dir, tiny_data)
    assert_same_bits(run_dir, reference)


def test_sigusr1_under_slurm_checkpoints_and_requeues_once(tiny_data, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = quiet_env(SLURM_JOB_ID="4242", PATH=f"{bin_dir}:{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    command = launch_command(2, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir", str(run_dir), *ARGS,
                             "--requeue")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=env, start_new_session=True)
    stdout, stderr, seconds = _signal_after_first_checkpoint(process, run_dir, rank=0, number=signal.SIGUSR1)
    assert seconds < 20 and reported_exit_codes(stderr) == {EXIT_PREEMPTED}, stderr
    assert calls.read_text().splitlines() == ["requeue 4242"]
    checkpoint.verify(checkpoint.list_checkpoints(run_dir / "checkpoints")[-1])


def _crash_during_save(checkpoints_dir, step):
    """Start a real save in another process and kill it (os._exit) after it wrote part of a file."""
    script = textwrap.dedent(f"""
        import os, torch, safetensors.torch
        from pathlib import Path
        from vgg_dist import checkpoint
        real = safetensors.torch.save_file
        def dying_save(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
            os._exit(9)
        checkpoint.save_file = dying_save
        checkpoint.save_checkpoint(Path({str(checkpoints_dir)!r}), {step},
                                   {{"model.safetensors": ({{"w": torch.ones(1000)}}, {{}})}}, {{"x": 1}})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60, capture_output=True)
    assert result.returncode == 9, result.stderr


def test_crash_while_saving_keeps_the_previous_checkpoint(reference, tiny_data, tmp_path):
    run_dir = stopped_copy(reference, tmp_path / "run", last_step=25)
    _crash_during_save(run_dir / "checkpoints", step=30)
    leftovers = list((run_dir / "checkpoints").glob(".tmp-*"))
    assert leftovers and not (run_dir / "checkpoints" / "step_0000030").exists()
    found = checkpoint.find_latest(run_dir / "checkpoints", say=print)
    assert found.name == "step_0000025"
    result = resume(run_dir, tiny_data)
    assert "step_0000025" in result.stdout and "interrupted save" in result.stdout
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert_same_bits(run_dir, reference)


def test_resume_auto_skips_an_incomplete_checkpoint(reference, tiny_data, tmp_path):
    run_dir = stopped_copy(reference, tmp_path / "run", last_step=40)
    (run_dir / "checkpoints" / "step_0000040" / "manifest.json").unlink()  # a save that never committed
    result = resume(run_dir, tiny_data)
    assert "skipping" in result.stdout and "step_0000040: incomplete checkpoint" in result.stdout
    assert "resumed from" in result.stdout and "step_0000035" in result.stdout
    assert_same_bits(run_dir, reference)


def _tiny_save(checkpoints_dir, step):
    return checkpoint.save_checkpoint(checkpoints_dir, step, {"model.safetensors": ({"w": torch.full((10,), step)}, {})},
                                      {"step": step})


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
    checkpoint.mark_best(checkpoints_dir, best, 0.9)
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


# ---- Bad checkpoints ------------------------------------------------------------------------------

def _rewrite_manifest(path):
    """Make the manifest agree with what is on disk, so a later check (not the hash) has to catch it."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {name: {"bytes": (path / name).stat().st_size, "sha256": checkpoint._sha256(path / name)}
                         for name in sorted(p.name for p in path.iterdir() if p.name != "manifest.json")}
    (path / "manifest.json").write_text(json.dumps(manifest))


class _Sentinel:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant_pickle(path, sentinel):
    torch.save({"0.0.weight": _Sentinel(str(sentinel))}, path / "model.safetensors")
    _rewrite_manifest(path)


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
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_with_one_line_and_nothing_changes(reference, tiny_data, tmp_path, case):
    damage, message = BAD_CHECKPOINTS[case]
    run_dir = stopped_copy(reference, tmp_path / "run", last_step=20)
    target = run_dir / "checkpoints" / "step_0000020"
    sentinel = tmp_path / "pickle-ran"
    damage(target, sentinel)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    result = run_bounded([sys.executable, TRAIN_SCRIPT, "--data-dir", str(tiny_data), *ARGS,
                          "--resume", str(target), "--output-dir", str(run_dir)], timeout=120)
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr and str(target) in result.stderr
    assert "epoch 1/" not in result.stdout  # refused before any training
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    assert not sentinel.exists()


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "32"], "holds a different model (image_size 64 here 32)"),
    (["--arch", "vgg13"], "holds a different model (arch vgg11 here vgg13)"),
    (["--batch-size", "32"], "was trained with --batch-size 16, not 32"),
])
def test_checkpoint_of_another_model_is_refused(reference, tiny_data, tmp_path, flags, message):
    target = final_checkpoint(reference)
    before = (target / "model.safetensors").read_bytes()
    result = run_bounded([sys.executable, TRAIN_SCRIPT, "--data-dir", str(tiny_data), *ARGS, *flags,
                          "--resume", str(target), "--output-dir", str(tmp_path / "new")], timeout=120)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert (target / "model.safetensors").read_bytes() == before


def test_another_num_classes_is_refused_before_weights_change(reference):
    from vgg_dist import checkpoint_state
    from vgg_dist.config import TrainConfig
    from vgg_dist.model import build_model
    config = TrainConfig(image_size=64, width_divisor=16, hidden_size=128, batch_size=16, epochs=3)
    spec = config.model_spec(in_channels=1, num_classes=7)
    model = build_model(spec)
    untouched = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(checkpoint.CheckpointError, match="num_classes 10 here 7"):
        checkpoint_state.read(final_checkpoint(reference), spec, config.to_dict(), model, optimizer, 0, 16)
    assert all(torch.equal(model.state_dict()[name], untouched[name]) for name in untouched)


def test_nonfinite_loss_stops_all_ranks_and_is_never_checkpointed(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    command = launch_command(2, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir", str(run_dir),
                             *ARGS, "--lr", "1e6", "--checkpoint-every", "1")
    result = run_bounded(command, timeout=120)
    assert result.returncode != 0
    assert reported_exit_codes(result.stderr) == {EXIT_DIVERGED}, result.stderr
    assert "error: non-finite loss or weights at step" in result.stderr
    bad_step = int(result.stderr.split("at step ")[1].split()[0])
    saved = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert all(int(path.name.split("_")[1]) < bad_step for path in saved)
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


def test_resume_on_fewer_processes_continues_the_same_run(tiny_data, tmp_path):
    # Without dropout the arithmetic is the same up to reduction order, so 2 -> 1 must land next to
    # the uninterrupted 2-process run (a wrong data order after the resume moves weights by ~1e-2).
    no_dropout = ["--dropout", "0", "--epochs", "2"]
    reference_dir, _ = train(tmp_path, tiny_data, *ARGS, *no_dropout, num_processes=2, name="reference")
    run_dir = stopped_copy(reference_dir, tmp_path / "run", last_step=20)
    result = resume(run_dir, tiny_data, num_processes=1, extra=no_dropout)
    assert "global step 20" in result.stdout
    ours, theirs = read_weights(run_dir), read_weights(reference_dir)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=3e-4, msg=name)
    assert read_metrics(run_dir)[1]["train_loss"] == pytest.approx(read_metrics(reference_dir)[1]["train_loss"],
                                                                   rel=1e-5)
    assert read_metrics(run_dir)[1]["train_samples"] == 256
    assert final_checkpoint(run_dir).name == final_checkpoint(reference_dir).name == "step_0000032"
