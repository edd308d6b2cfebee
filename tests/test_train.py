"""End-to-end training through `accelerate launch`, on 1 and 2 real CPU processes."""

import json
import sys

import pytest
import torch

from conftest import (TINY_MODEL, TRAIN_SCRIPT, launch_command, quiet_env, read_metrics, read_weights,
                      run_bounded, train)


def test_two_processes_count_every_test_image_once_and_evaluate_agrees(tmp_path, tiny_data):
    # 77 test images with a global batch of 8 over 2 processes: the last batch is 5, uneven.
    run_dir, result = train(tmp_path, tiny_data, *TINY_MODEL, "--epochs", "2", "--batch-size", "8",
                            num_processes=2)
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["test_samples"] == 77 for m in metrics)
    assert all(m["train_samples"] == 256 for m in metrics)
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == (f"loss {metrics[-1]['train_loss']:.3f}, train acc {metrics[-1]['train_acc']:.3f}, "
                         f"test acc {metrics[-1]['test_acc']:.3f}")
    assert lines[-1].endswith("examples/sec on cpu:0 (2 processes)")
    assert result.stdout.count("epoch 1/2") == 1  # printed by the main process only

    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["arch"] == "vgg11" and config["model"]["in_channels"] == 1
    assert config["class_names"][9] == "Ankle boot" and config["launch"]["num_processes"] == 2
    assert config["final_metrics"]["test_acc"] == metrics[-1]["test_acc"]

    evaluated = run_bounded([sys.executable, "-m", "vgg_dist.evaluate", "--checkpoint", str(run_dir)], timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["test_samples"] == 77
    assert report["test_acc"] == metrics[-1]["test_acc"]


def test_evaluate_under_two_processes(tmp_path, tiny_data):
    run_dir, _ = train(tmp_path, tiny_data, *TINY_MODEL, "--epochs", "1", "--batch-size", "16")
    command = launch_command(2, "-m", "vgg_dist.evaluate", "--checkpoint", str(run_dir), "--batch-size", "6")
    result = run_bounded(command, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["test_samples"] == 77
    assert report["test_acc"] == read_metrics(run_dir)[-1]["test_acc"]


def test_one_and_two_processes_take_the_same_steps(tmp_path, tiny_data):
    args = [*TINY_MODEL, "--epochs", "1", "--batch-size", "32", "--max-train-samples", "128",
            "--dropout", "0", "--seed", "5"]
    one, _ = train(tmp_path, tiny_data, *args, num_processes=1, name="one")
    two, _ = train(tmp_path, tiny_data, *args, num_processes=2, name="two")
    weights_one, weights_two = read_weights(one), read_weights(two)
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-5, atol=1e-6, msg=name)
    metrics_one, metrics_two = read_metrics(one)[0], read_metrics(two)[0]
    assert metrics_one["train_samples"] == metrics_two["train_samples"] == 128  # four steps of 32 each
    assert metrics_two["train_loss"] == pytest.approx(metrics_one["train_loss"], rel=1e-5)


def test_training_moves_the_weights(tmp_path, tiny_data):
    args = [*TINY_MODEL, "--epochs", "1", "--batch-size", "32", "--max-train-samples", "64"]
    run_dir, _ = train(tmp_path, tiny_data, *args)
    torch.manual_seed(0)
    from vgg_dist.model import ModelSpec, build_model
    initial = build_model(ModelSpec(width_divisor=16, image_size=32, hidden_size=64)).state_dict()
    trained = read_weights(run_dir)
    assert not torch.equal(initial["0.0.weight"], trained["0.0.weight"])


def test_a_short_run_learns(tmp_path, learnable_data):
    run_dir, _ = train(tmp_path, learnable_data, "--image-size", "32", "--width-divisor", "8",
                       "--hidden-size", "128", "--batch-norm", "--epochs", "3", "--batch-size", "32",
                       num_processes=2)
    final = read_metrics(run_dir)[-1]
    assert final["test_acc"] > 0.6, final  # chance is 0.1
    assert final["train_loss"] < read_metrics(run_dir)[0]["train_loss"]


BAD_FLAGS = {
    "zero epochs": (["--epochs", "0"], "--epochs must be a positive integer"),
    "negative lr": (["--lr", "-1"], "--lr must be a positive number"),
    "unknown arch": (["--arch", "vgg12"], "--arch 'vgg12' is unknown"),
    "image size": (["--image-size", "100"], "--image-size must be a multiple of 32"),
    "width divisor": (["--width-divisor", "0"], "--width-divisor must be a positive integer"),
    "not a number": (["--batch-size", "lots"], "argument --batch-size: invalid int value"),
    "unknown flag": (["--epoch", "3"], "unrecognized arguments"),
    "batch over data": (["--batch-size", "512"], "--batch-size 512 is larger than the 256 training images"),
    "missing data dir": (["--data-dir", "/nonexistent/vgg"], "--data-dir /nonexistent/vgg: not a directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_fail_with_one_line_and_exit_2(tmp_path, tiny_data, case):
    args, message = BAD_FLAGS[case]
    data = [] if "--data-dir" in args else ["--data-dir", str(tiny_data)]
    result = run_bounded([sys.executable, TRAIN_SCRIPT, *data, *TINY_MODEL, "--output-dir",
                          str(tmp_path / "run"), *args], timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_existing_run_is_never_overwritten(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.safetensors").write_bytes(b"precious")
    result = run_bounded([sys.executable, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir",
                          str(run_dir)], timeout=60)
    assert result.returncode == 2 and "--output-dir" in result.stderr and "already exists" in result.stderr
    assert (run_dir / "model.safetensors").read_bytes() == b"precious"


def test_batch_must_split_over_processes(tmp_path, tiny_data):
    command = launch_command(2, TRAIN_SCRIPT, "--data-dir", str(tiny_data), *TINY_MODEL, "--batch-size", "7",
                             "--output-dir", str(tmp_path / "run"))
    result = run_bounded(command, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("error: --batch-size 7 does not split evenly over 2 processes") == 1


def test_fp16_without_a_gpu_is_refused(tmp_path, tiny_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, where fp16 is valid")
    result = run_bounded([sys.executable, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir",
                          str(tmp_path / "run")], timeout=60,
                         env=quiet_env(ACCELERATE_MIXED_PRECISION="fp16"))
    assert result.returncode == 2
    assert "error: --mixed_precision fp16 needs a GPU" in result.stderr


def test_no_data_anywhere_says_how_to_get_it(tmp_path):
    env = quiet_env(HF_HOME=str(tmp_path / "hf"), HF_DATASETS_OFFLINE="1")
    result = run_bounded([sys.executable, TRAIN_SCRIPT, "--output-dir", str(tmp_path / "run")], timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "pass --data-dir DIR" in result.stderr


def test_bf16_gradient_all_reduce_is_applied_and_stays_close(tmp_path, tiny_data):
    args = [*TINY_MODEL, "--epochs", "1", "--batch-size", "32", "--max-train-samples", "128", "--dropout", "0"]
    exact, _ = train(tmp_path, tiny_data, *args, num_processes=2, name="fp32_grads")
    rounded, _ = train(tmp_path, tiny_data, *args, "--ddp-bf16-grads", num_processes=2, name="bf16_grads")
    exact_weights, rounded_weights = read_weights(exact), read_weights(rounded)
    assert any(not torch.equal(exact_weights[name], rounded_weights[name]) for name in exact_weights)
    for name in exact_weights:  # bf16 keeps ~3 significant digits of each gradient
        torch.testing.assert_close(rounded_weights[name], exact_weights[name], rtol=0.05, atol=2e-3, msg=name)
