"""launch/slurm/*.sbatch against a real SLURM: slurmctld and two slurmd nodes (n1, n2) on this machine,
started by tests/slurm/cluster.sh, jobs submitted by an unprivileged user from fresh checkouts.

    python -m pytest -q -m slurm      # as root: installs slurm-wlm and munge if missing

The three jobs run side by side (each node offers 4 CPUs): an uninterrupted 2-node run, and a 2-node and a
1-node (2-process) run that the natural time limit stops. Their first allocation is --time=2 with
--signal=USR1@60, so SLURM signals the ranks 30 to 60 s after the start (it checks its timers every
30 s); the ranks checkpoint and rank 0 requeues the job. Once the job is requeued the test lifts its
time limit, as an administrator may, so that the requeued run is not stopped a second time whatever
this machine's speed. Both stopped runs must end with the uninterrupted run's weights, bit for bit.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vgg_dist.data.synthetic import write_dataset

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
USER = "vggtest"
# ~50 s of training on 2 otherwise idle cores: longer than the first allocation's 30-60 s to the signal.
TRAIN_FLAGS = ["--image-size", "32", "--width-divisor", "16", "--hidden-size", "64", "--batch-size", "16",
               "--max-train-samples", "512", "--max-eval-samples", "64", "--epochs", "50"]
EPOCHS = 50
STOPPED_BY_THE_LIMIT = ["--time=2", "--signal=USR1@60"]
JOB_TIMEOUT = 480  # seconds, per job, from submission to its final state
FINAL_STATES = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE"}


class Cluster:
    def __init__(self, base: Path):
        self.base = base
        self.state_dir = base / "cluster"
        self.conf = self.state_dir / "slurm.conf"
        self.data = base / "data"
        self.home = base / "home"

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30,
                              env=self.env()).stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (empty when SLURM no longer knows the job)."""
        fields = {}
        for token in self.scontrol("show", "job", "-o", job_id).split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def checkout(self, name: str) -> Path:
        """A fresh copy of the repository (its tracked and unignored files), owned by the job's user, with
        no logs/ directory."""
        target = self.base / name
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.split("\0")
        for relative in filter(None, listed):
            source = REPO / relative
            if relative.startswith("logs/") or not source.is_file():
                continue
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
        chown_tree(target)
        assert not (target / "logs").exists()
        return target

    def submit(self, checkout: Path, script: str, sbatch_args: list[str], **env: str) -> str:
        """sbatch as the unprivileged user from `checkout`, as a user would type it; returns the job id."""
        job_env = {**self.env(), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(self.home),
                   "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                   "MIXED_PRECISION": "no", **env}
        command = ["runuser", "-u", USER, "--", "env", "-i", *(f"{k}={v}" for k, v in job_env.items()),
                   "sbatch", "--parsable", "--gpus-per-node=0", *sbatch_args, script,
                   "--data-dir", str(self.data), *TRAIN_FLAGS]
        result = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def describe(self, job_id: str, checkout: Path) -> str:
        """What a failure message needs: the job's state, its logs, and the daemons' last lines."""
        parts = [f"scontrol show job {job_id}:\n{self.scontrol('show', 'job', job_id)}"]
        logs = sorted(checkout.glob("*.out")) + sorted(checkout.glob("logs/*.out"))
        parts += [f"--- {path} (last 40 lines)\n" + "\n".join(path.read_text().splitlines()[-40:]) for path in logs]
        for name in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log"):
            path = self.state_dir / name
            if path.exists():
                parts.append(f"--- {name} (last 15 lines)\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)


def chown_tree(path: Path) -> None:
    subprocess.run(["chown", "-R", f"{USER}:", str(path)], check=True)


def open_path_to(path: Path, opened: list[tuple[Path, int]]) -> None:
    """Let other users through every directory above `path` (a venv under /root, or under a 0700
    `mktemp -d`), remembering each mode changed so it can be put back."""
    for directory in reversed(path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            opened.append((directory, mode))
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests need root: they install slurm-wlm and munge, start the daemons and "
                    "submit as another user")
    base = Path(tempfile.mkdtemp(prefix="vgg_dist-slurm-"))
    base.chmod(0o755)
    cluster = Cluster(base)
    opened: list[tuple[Path, int]] = []
    env = {**os.environ, "SLURM_TEST_DIR": str(cluster.state_dir), "SLURM_TEST_USER": USER}
    started = time.monotonic()
    start = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, env=env, timeout=900)
    try:
        assert start.returncode == 0, f"cluster.sh start failed:\n{start.stdout}\n{start.stderr}"
        print(f"\nSLURM cluster up in {time.monotonic() - started:.0f} s")
        for target in (Path(sys.executable), Path(sys.executable).resolve(), Path(sys.prefix)):
            open_path_to(target, opened)
        check = subprocess.run(["runuser", "-u", USER, "--", sys.executable, "-c", "import torch, accelerate"],
                               capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, f"{USER} cannot run {sys.executable}: {check.stderr}"
        write_dataset(cluster.data, train=512, test=64, seed=1)
        cluster.home.mkdir()
        chown_tree(cluster.data)
        chown_tree(cluster.home)
        yield cluster
    finally:
        stop = subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, text=True, env=env, timeout=120)
        for directory, mode in reversed(opened):
            directory.chmod(stat.S_IMODE(mode))
        shutil.rmtree(base, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr


class Submitted:
    def __init__(self, job_id: str, checkout: Path, run_dir: Path, submitted: float):
        self.job_id, self.checkout, self.run_dir, self.submitted = job_id, checkout, run_dir, submitted
        self.requeued_at: float | None = None
        self.lock_after_requeue: bool | None = None
        self.tmp_after_requeue: list[str] = []
        self.final: dict[str, str] = {}
        self.seconds: float | None = None


class TimeLimitLifter(threading.Thread):
    """Once a stopped job shows Restarts=1, note what its first run left in the run directory, then give
    the requeued run 10 minutes (as root), so it finishes instead of being stopped again."""

    def __init__(self, cluster: Cluster, jobs: list[Submitted]):
        super().__init__(daemon=True)
        self.cluster, self.jobs, self.done = cluster, jobs, threading.Event()

    def run(self):
        waiting = list(self.jobs)
        while waiting and not self.done.wait(0.5):
            for job in list(waiting):
                info = self.cluster.job(job.job_id)
                if int(info.get("Restarts", "0")) >= 1:
                    job.requeued_at = time.monotonic()
                    job.lock_after_requeue = (job.run_dir / ".vgg_dist.lock").exists()
                    job.tmp_after_requeue = [str(path) for path in job.run_dir.rglob("*tmp*")]
                    self.cluster.scontrol("update", f"JobId={job.job_id}", "TimeLimit=10")
                    waiting.remove(job)
                elif info.get("JobState") in FINAL_STATES:
                    waiting.remove(job)


@pytest.fixture(scope="module")
def jobs(cluster):
    """The three jobs, submitted together; each test waits for its own."""
    started = time.monotonic()
    submitted = {}
    checkout = cluster.checkout("uninterrupted")
    submitted["uninterrupted"] = Submitted(
        cluster.submit(checkout, "launch/slurm/train.sbatch", ["--cpus-per-task=1", "--time=10"],
                       GPUS_PER_NODE="1", RUN_DIR="runs/two-nodes"), checkout, checkout / "runs/two-nodes", started)
    checkout = cluster.checkout("two-nodes-stopped")
    submitted["two_nodes_stopped"] = Submitted(
        cluster.submit(checkout, "launch/slurm/train.sbatch", ["--cpus-per-task=1", *STOPPED_BY_THE_LIMIT],
                       GPUS_PER_NODE="1", RUN_DIR="runs/two-nodes"), checkout, checkout / "runs/two-nodes", started)
    checkout = cluster.checkout("one-node-stopped")
    submitted["one_node_stopped"] = Submitted(
        cluster.submit(checkout, "launch/slurm/train_single_node.sbatch", ["--cpus-per-task=2", *STOPPED_BY_THE_LIMIT],
                       GPUS_PER_NODE="2", RUN_DIR="runs/one-node"), checkout, checkout / "runs/one-node", started)
    lifter = TimeLimitLifter(cluster, [submitted["two_nodes_stopped"], submitted["one_node_stopped"]])
    lifter.start()
    yield submitted
    lifter.done.set()
    lifter.join(timeout=10)
    for job in submitted.values():  # a test that failed early leaves its job running: end it
        if cluster.job(job.job_id).get("JobState") not in FINAL_STATES:
            subprocess.run(["scancel", job.job_id], env=cluster.env(), timeout=30)
    print(f"\nSLURM jobs: {time.monotonic() - started:.0f} s from the first submission to the last test's end")


def wait_for(cluster: Cluster, job: Submitted) -> dict[str, str]:
    deadline = job.submitted + JOB_TIMEOUT
    while True:
        info = cluster.job(job.job_id)
        if info.get("JobState") in FINAL_STATES:
            job.final, job.seconds = info, time.monotonic() - job.submitted
            print(f"\njob {job.job_id}: {info.get('JobState')} Restarts={info.get('Restarts')} "
                  f"ExitCode={info.get('ExitCode')} after {job.seconds:.0f} s")
            return info
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job.job_id], env=cluster.env(), timeout=30)
            pytest.fail(f"job {job.job_id} not done within {JOB_TIMEOUT} s\n{cluster.describe(job.job_id, job.checkout)}")
        time.sleep(1)


def metrics_epochs(run_dir: Path) -> list[int]:
    import json
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_clean(run_dir: Path) -> None:
    assert not (run_dir / ".vgg_dist.lock").exists()
    leftovers = [str(path) for path in run_dir.rglob("*") if "tmp" in path.name or ".abandoned" in path.name]
    assert leftovers == []


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    ours, theirs = load_file(run_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not ours[name].equal(theirs[name])]
    assert different == [], f"tensors that differ from the uninterrupted run: {different}"


def test_two_nodes_train_to_completion_from_a_fresh_checkout_without_logs(cluster, jobs):
    job = jobs["uninterrupted"]
    info = wait_for(cluster, job)
    details = cluster.describe(job.job_id, job.checkout)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", details
    # The main log in the submit directory, the training's lines in logs/, made by the script.
    main_log = (job.checkout / f"vgg_dist-{job.job_id}.out").read_text()
    assert f"training output in logs/vgg_dist-{job.job_id}-node*.out" in main_log, details
    node0 = (job.checkout / "logs" / f"vgg_dist-{job.job_id}-node0.out").read_text()
    assert (job.checkout / "logs" / f"vgg_dist-{job.job_id}-node1.out").exists(), details
    assert "world size 2 = 2 nodes x 1 process per node" in node0, details
    import json
    config = json.loads((job.run_dir / "config.json").read_text())
    assert config["weights_identical_across_ranks"] is True
    assert [entry["node"] for entry in config["launch"]["ranks"]] == [0, 1]
    assert metrics_epochs(job.run_dir) == list(range(1, EPOCHS + 1))
    assert_clean(job.run_dir)


def check_stopped_once_and_resumed(cluster: Cluster, job: Submitted, log: Path, reference: Path) -> None:
    info = wait_for(cluster, job)
    details = cluster.describe(job.job_id, job.checkout)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", details
    assert job.requeued_at is not None, details
    # What the first run left for the requeued one, wherever that one's rank 0 lands: no lock, no tmp file.
    assert job.lock_after_requeue is False and job.tmp_after_requeue == [], details
    text = log.read_text()
    lines = text.splitlines()
    checkpointed = [line for line in lines if line.startswith("stop signal received: checkpoint ")]
    requeued = [line for line in lines if line.startswith("requeued SLURM job")]
    resumed = [line for line in lines if line.startswith("resumed from ")]
    assert len(checkpointed) == 1 and requeued == [f"requeued SLURM job {job.job_id}"] and len(resumed) == 1, details
    print(f"\n{checkpointed[0]}\n{requeued[0]}\n{resumed[0]}")
    stopped_at = checkpointed[0].removeprefix("stop signal received: checkpoint ").removesuffix(" written")
    assert resumed[0].startswith(f"resumed from {stopped_at}: epoch "), details
    assert "stopped: by SIGUSR1" in text, details  # the time-limit signal, caught by the ranks themselves
    assert metrics_epochs(job.run_dir) == list(range(1, EPOCHS + 1))
    assert_clean(job.run_dir)
    assert_same_weights(job.run_dir, reference)


def test_two_nodes_stopped_by_the_time_limit_checkpoint_requeue_once_and_finish_bitwise(cluster, jobs):
    job, reference = jobs["two_nodes_stopped"], jobs["uninterrupted"]
    wait_for(cluster, reference)
    check_stopped_once_and_resumed(cluster, job, job.checkout / "logs" / f"vgg_dist-{job.job_id}-node0.out",
                                   reference.run_dir)


def test_single_node_stopped_by_the_time_limit_checkpoint_requeue_once_and_finish_bitwise(cluster, jobs):
    job, reference = jobs["one_node_stopped"], jobs["uninterrupted"]
    wait_for(cluster, reference)
    # One node, two processes: the training's lines are in the job's one log.
    check_stopped_once_and_resumed(cluster, job, job.checkout / f"vgg_dist-{job.job_id}.out", reference.run_dir)
    assert not (job.checkout / "logs").exists()
