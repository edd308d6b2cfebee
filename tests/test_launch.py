"""Launch files and multi-node behaviour, on loopback: two "machines" are two launchers on this host."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from conftest import (REPO, TINY_MODEL, TRAIN_SCRIPT, free_port, quiet_env, read_metrics)

LAUNCH = REPO / "launch"
# What each shipped config promises in its header, checked against what Accelerate loads from it.
PROMISES = {
    "single_gpu.yaml": {"distributed_type": "NO", "num_processes": 1, "mixed_precision": "bf16"},
    "multi_gpu.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 1, "num_processes": 8,
                       "mixed_precision": "bf16", "gpu_ids": "all"},
    "multi_node.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 2, "num_processes": 16,
                        "rdzv_backend": "c10d", "main_process_port": 29500, "machine_rank": 0},
    "cpu_multi_process.yaml": {"distributed_type": "MULTI_GPU", "num_processes": 2, "use_cpu": False,
                               "mixed_precision": "no"},
    "cpu.yaml": {"distributed_type": "NO", "num_processes": 1, "use_cpu": True, "mixed_precision": "no"},
}


def loopback_env(**extra):
    # gloo must use the loopback interface, whatever else the host has.
    return quiet_env(GLOO_SOCKET_IFNAME="lo", **extra)


@pytest.mark.parametrize("name", sorted(PROMISES))
def test_shipped_config_loads_with_accelerate_and_keeps_its_promises(name):
    path = LAUNCH / name
    config = load_config_from_file(str(path))
    for key, value in PROMISES[name].items():
        loaded = getattr(config, key)
        assert (loaded.value if hasattr(loaded, "value") else loaded) == value, key
    header = path.read_text().splitlines()[0]
    assert header.startswith("# accelerate launch") or header.startswith("# On every node")
    assert f"launch/{name}" in path.read_text()


def test_every_launch_file_is_covered():
    shipped = {path.name for path in LAUNCH.glob("*.yaml")}
    assert shipped == set(PROMISES)
    for sbatch in (LAUNCH / "slurm").glob("*.sbatch"):
        assert sbatch.read_text().splitlines()[1].startswith(f"# sbatch launch/slurm/{sbatch.name}")
    for script in [*(LAUNCH / "slurm").glob("*.sbatch"), *LAUNCH.glob("*.sh")]:
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
    assert (REPO / "tools" / "gpu_check.sh").read_text().splitlines()[1] == "# bash tools/gpu_check.sh OUT_DIR"


def machine_command(rank, port, run_dir, data, *extra, processes_per_machine=1):
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(rank), "--num_processes", str(2 * processes_per_machine),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no", TRAIN_SCRIPT, "--data-dir", str(data), *TINY_MODEL,
            "--output-dir", str(run_dir), *extra]


def start_all(commands, env):
    return [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env=env, start_new_session=True) for command in commands]


def finish_all(processes, timeout):
    outputs = []
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(1, deadline - time.monotonic())))
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return outputs


def test_two_machines_on_loopback_train_one_model(tmp_path, tiny_data):
    port, run_dir = free_port(), tmp_path / "run"
    processes = start_all([machine_command(rank, port, run_dir, tiny_data, "--epochs", "2", "--batch-size", "8",
                                           processes_per_machine=1) for rank in (0, 1)], loopback_env())
    outputs = finish_all(processes, timeout=240)
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stdout + stderr
    main_stdout = outputs[0][0]
    assert "world size 2 = 2 nodes x 1 process per node" in main_stdout
    assert "ranks 0:node0/cpu, 1:node1/cpu" in main_stdout
    assert outputs[1][0].count("epoch 1/2") == 0  # only the global main process prints
    assert all(m["test_samples"] == 77 for m in read_metrics(run_dir))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["launch"]["nodes"] == 2 and config["launch"]["num_processes"] == 2
    assert config["weights_identical_across_ranks"] is True


def test_a_killed_rank_ends_the_whole_job_within_the_dist_timeout(tmp_path, tiny_data):
    import psutil
    port, run_dir, dist_timeout = free_port(), tmp_path / "run", 20
    processes = start_all([machine_command(rank, port, run_dir, tiny_data, "--epochs", "500", "--batch-size", "8",
                                           "--dist-timeout", str(dist_timeout)) for rank in (0, 1)], loopback_env())
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "never trained"
            time.sleep(0.05)
        victims = [child for child in psutil.Process(processes[1].pid).children(recursive=True)
                   if TRAIN_SCRIPT in child.cmdline()]
        assert len(victims) == 1
        victims[0].kill()
        killed = time.monotonic()
        outputs = finish_all(processes, timeout=dist_timeout + 60)
        elapsed = time.monotonic() - killed
    finally:
        finish_all(processes, timeout=1)
    assert all(process.returncode not in (0, None) for process in processes)
    assert elapsed < dist_timeout + 30, elapsed
    assert "rank      : 1" in outputs[1][1] and "SIGKILL" in outputs[1][1]  # the launcher names the dead rank


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def fake_slurm(tmp_path: Path) -> tuple[dict, Path, Path]:
    """Stub srun/scontrol/sbatch on PATH, a submit directory, and the environment SLURM would give the
    batch script; returns (env, submit_dir, calls_log)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    # srun: start the step's command once per node, as SLURM would, each with its own node id, and
    # forward SIGTERM to them as the real srun does.
    _stub(stubs, "srun", f"""
echo "srun $*" >> {calls}
while [[ "$1" == --* ]]; do shift; done
pids=()
trap 'kill -TERM "${{pids[@]}}" 2>/dev/null' TERM
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
status=0
for pid in "${{pids[@]}}"; do
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; code=$?; done
  wait "$pid"; code=$?
  [ "$code" -ne 0 ] && status=$code
done
exit $status
""")
    _stub(stubs, "scontrol",
          f'echo "scontrol $*" >> {calls}\nif [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; fi\n')
    _stub(stubs, "sbatch", f'echo "sbatch $*" >> {calls}\n')
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    (submit_dir / "vgg_dist").symlink_to(REPO / "vgg_dist")
    env = loopback_env(PATH=f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_JOB_ID="777",
                       SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=str(submit_dir),
                       GPUS_PER_NODE="1", MIXED_PRECISION="no", MAIN_PROCESS_PORT=str(free_port()),
                       RUN_DIR=str(tmp_path / "run"))
    return env, submit_dir, calls


SBATCH = str(LAUNCH / "slurm" / "train.sbatch")


def test_sbatch_forms_one_world_and_turns_the_time_limit_signal_into_a_checkpoint_and_one_requeue(tmp_path,
                                                                                                   tiny_data):
    env, submit_dir, calls = fake_slurm(tmp_path)
    run_dir = tmp_path / "run"
    script = subprocess.Popen(["bash", SBATCH, "--data-dir", str(tiny_data), *TINY_MODEL, "--epochs", "500",
                               "--batch-size", "8", "--sync-every", "1"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=submit_dir, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists():
            assert time.monotonic() < deadline and script.poll() is None, "never trained"
            time.sleep(0.05)
        script.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@90` delivers to the batch script
        stdout, stderr = script.communicate(timeout=90)
    finally:
        finish_all([script], timeout=1)
    # torchrun's agents exit non-zero after forwarding SIGTERM; what matters is what the workers did.
    assert script.returncode != 0
    assert "world size 2 = 2 nodes x 1 process per node" in stdout and "ranks 0:node0/cpu, 1:node1/cpu" in stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert [entry["node"] for entry in config["launch"]["ranks"]] == [0, 1]
    assert "scontrol show hostnames node[1-2]" in calls.read_text()
    assert "time limit near" in stdout and "stop signal received: checkpoint" in stdout, stdout + stderr
    assert "requeued SLURM job 777" in stdout
    requeues = [line for line in calls.read_text().splitlines() if line.startswith("scontrol requeue")]
    assert requeues == ["scontrol requeue 777"]
    from vgg_dist.store import checkpoint
    newest = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1]
    checkpoint.verify(newest)
    assert f"checkpoint {newest}" in stdout  # the one written on the way out is complete


def test_gpu_check_summary_computes_each_figure_from_the_files_and_marks_failures(tmp_path):
    """tools/summarize_gpu_check.py on an OUT directory shaped like gpu_check.sh's (small made-up runs)."""
    def epoch(number, seconds, accuracy, memory):
        return {"epoch": number, "train_samples": 1000, "seconds": seconds, "eval_seconds": 0.5,
                "examples_per_sec": 1000 / seconds, "test_acc": accuracy, "peak_memory_bytes": memory}

    for name, accuracy in (("fast", 0.94), ("fast_seed1", 0.92), ("fast_seed2", 0.93)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.txt").write_text("...\n")
        epochs = [epoch(1, 4.0, 0.5, 3 * 2**20), epoch(2, 1.0, 0.8, 2 * 2**20), epoch(3, 0.5, accuracy, 2 * 2**20)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
        (tmp_path / name / "wall_seconds.txt").write_text("12.25\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "log.txt").write_text("vgg_dist: --cuda-graphs needs a GPU and none is visible\n")
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "log.txt").write_text("epoch 1/40: ...\n")
    (tmp_path / "slow" / "metrics.jsonl").write_text(json.dumps(epoch(1, 4.0, 0.5, 2**20)) + "\n")
    (tmp_path / "steps.log").write_text("== 10:00:00 train slow\ntrain slow failed (124)\n")
    (tmp_path / "bench_eager.json").write_text(json.dumps({
        "precision": "bf16", "compile_mode": "default", "fused_pool": False, "cuda_graphs": True,
        "vgg_dist": {"images_per_sec": 41234.5, "compiled": False, "warmup_seconds": 2.0,
                     "peak_memory_bytes": 1536 * 2**20}}))
    (tmp_path / "bench_eager.log").write_text("table\n")
    (tmp_path / "bench_crashed.log").write_text("Traceback ...\nRuntimeError: capture failed\n")

    result = subprocess.run([sys.executable, str(REPO / "tools" / "summarize_gpu_check.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # 3000 images over 5.5 s of training; epochs 2+ at 1000 and 2000 img/s; 7 s training + evaluation.
    assert "| fast | 3 | 0.9400 | 545 | 1,500 | 4.0 | 7.0 | 12.2 | 2–2 |" in lines
    assert "| broken | failed: vgg_dist: --cuda-graphs needs a GPU and none is visible |" in lines
    assert "| slow | stopped with exit status 124 after 1 epoch(s): epoch 1/40: ... |" in lines
    assert "| eager | bf16 | no | False | True | 41,234 |  | 2.0 | 1,536 |" in lines
    assert "| crashed | failed: RuntimeError: capture failed |" in lines
    assert "fast: 3 seeds, mean test acc 0.9300 (sd 0.0100; 0.9400, 0.9200, 0.9300)" in lines
    refused = subprocess.run([sys.executable, str(REPO / "tools" / "summarize_gpu_check.py"), str(tmp_path / "no")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "usage:" in refused.stderr


def test_the_cpu_quick_start_ends_a_refusal_with_its_one_error_line():
    """The README's CPU command: no launcher warning before the run, and our `error:` line last, not the
    launcher's traceback. `accelerate launch` reports any failed worker as exit 1, whatever its code."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(LAUNCH / "cpu.yaml"),
               TRAIN_SCRIPT, "--epochs", "0"]
    result = subprocess.run(command, capture_output=True, text=True, env=quiet_env(), cwd=REPO, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: --epochs must be a positive integer, got 0"], result.stderr
