"""Launch files and multi-node behaviour, on loopback: two "machines" are two launchers on this host."""

import json
import os
import signal
import subprocess
import sys
import time

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


@pytest.mark.slow
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


@pytest.mark.slow
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
