"""End-to-end training: real launches on 1 and 2 CPU processes, and runs in this process where one
process is all a test needs."""

import json
import shutil
import sys

import pytest
import torch

from conftest import (TINY_MODEL, TRAIN_SCRIPT, launch_command, read_metrics, read_weights, run_bounded,
                      run_main, train, train_here)
from vgg_dist import evaluate


def test_two_processes_count_every_image_once(shared_run):
    # 77 test images with a global batch of 8 over 2 processes: the last batch is 5, uneven.
    run_dir, result = shared_run
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["test_samples"] == 77 and m["val_samples"] == 64 and m["train_samples"] == 192 for m in metrics)
    assert all(m["test_loss"] > 0 and m["val_loss"] > 0 and m["lr"] == 0.05 for m in metrics)
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == (f"loss {metrics[-1]['train_loss']:.3f}, train acc {metrics[-1]['train_acc']:.3f}, "
                         f"test acc {metrics[-1]['test_acc']:.3f}")
    assert lines[-1].endswith("examples/sec on cpu (2 processes)")
    assert result.stdout.count("epoch 1/2: loss") == 1  # printed by the main process only
    assert "val acc" in result.stdout

    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["arch"] == "vgg11" and config["model"]["in_channels"] == 1
    assert config["class_names"][9] == "Ankle boot" and config["launch"]["num_processes"] == 2
    assert config["final_metrics"]["test_acc"] == metrics[-1]["test_acc"]
    assert config["train_samples"] == 192 and config["train_samples_per_epoch"] == 192
    assert config["val_samples"] == 64 and config["flags"]["output_dir"] == str(run_dir)


def test_shipped_cpu_config_gives_one_two_process_job(shared_run):
    _, result = shared_run
    assert "world size 2 = 1 node x 2 processes per node, backend gloo, ranks 0:node0/cpu, 1:node0/cpu" in result.stdout
    assert "vgg_dist: recipe chapter, vgg11 / 16" in result.stdout


def test_evaluate_reproduces_the_final_accuracy_with_ema_weights_and_tta(shared_run):
    run_dir, _ = shared_run
    final = read_metrics(run_dir)[-1]
    code, stdout, _ = run_main(evaluate.main, ["--checkpoint", str(run_dir)])
    report = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and report["test_samples"] == 77
    assert report["test_acc"] == final["test_acc"]  # the saved weights are the EMA's, evaluated with TTA
    assert report["test_loss"] == pytest.approx(final["test_loss"], rel=1e-6)
    code, stdout, _ = run_main(evaluate.main, ["--checkpoint", str(run_dir), "--no-tta"])
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["test_loss"] != pytest.approx(final["test_loss"])


@pytest.mark.slow
def test_evaluate_under_two_processes(shared_run):
    run_dir, _ = shared_run
    result = run_bounded(launch_command(2, "-m", "vgg_dist.evaluate", "--checkpoint", str(run_dir),
                                        "--batch-size", "6"), timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["test_samples"] == 77 and report["test_acc"] == read_metrics(run_dir)[-1]["test_acc"]


def test_evaluate_takes_a_checkpoint_and_the_best_one(shared_run):
    run_dir, _ = shared_run
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert set(best) == {"checkpoint", "val_acc"}  # chosen on the validation split, not the test set
    # The best epoch's record: a checkpoint evaluates to exactly what its epoch reported (EMA weights, TTA).
    step = int(best["checkpoint"].split("_")[1])
    reported = next(m for m in read_metrics(run_dir) if m["global_step"] == step)
    assert best["val_acc"] == reported["val_acc"]
    for target in (run_dir / "checkpoints" / best["checkpoint"], run_dir / "checkpoints" / "best"):
        code, stdout, stderr = run_main(evaluate.main, ["--checkpoint", str(target)])
        assert code == 0, stderr
        report = json.loads(stdout.strip().splitlines()[-1])
        assert report["test_samples"] == 77 and report["test_acc"] == reported["test_acc"]


# 1 and N processes take the same steps: the global batch is split, augmentation is drawn for the
# global batch, and BatchNorm statistics are synchronised. Dropout is off (its masks are per process).
# Flips are left out here: with them this tiny model on upsampled synthetic images is so sensitive to
# rounding (near-ties in its max-pools) that one process in two memory layouts already drifts 2e-3 in
# two steps; test_recipes checks that each process flips exactly its rows of the global batch.
EQUIVALENCE = [*TINY_MODEL, "--epochs", "1", "--batch-size", "32", "--max-train-samples", "64", "--dropout", "0",
               "--seed", "5", "--batch-norm", "--random-crop-padding", "2", "--random-erase", "0.5",
               "--checkpoint-every", "1", "--keep-last", "0"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_data):
    run_dir, _ = train(tmp_path_factory.mktemp("equivalence"), tiny_data, *EQUIVALENCE, num_processes=2, name="two")
    return run_dir


@pytest.mark.slow
def test_one_and_two_processes_take_the_same_steps(two_process_run, tiny_data, tmp_path):
    one, _, _ = train_here(tmp_path, tiny_data, *EQUIVALENCE, name="one")
    weights_one, weights_two = read_weights(one), read_weights(two_process_run)
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-5, atol=1e-5, msg=name)
    metrics_one, metrics_two = read_metrics(one)[0], read_metrics(two_process_run)[0]
    assert metrics_one["train_samples"] == metrics_two["train_samples"] == 64  # two steps of 32 each
    assert metrics_two["train_loss"] == pytest.approx(metrics_one["train_loss"], rel=1e-5)
    # The running curve is the global batch's too, not rank 0's rows: the same points as one process draws.
    curve_one, curve_two = ([json.loads(line) for line in (run / "train_curve.jsonl").read_text().splitlines()]
                            for run in (one, two_process_run))
    assert curve_one and [p["global_step"] for p in curve_two] == [p["global_step"] for p in curve_one]
    for mine, theirs in zip(curve_two, curve_one):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["train_acc"] == pytest.approx(theirs["train_acc"], abs=1e-9)


@pytest.mark.parametrize("flags, processes, kind", [
    (["--batch-norm"], 2, "GlobalBatchNorm2d"),             # synchronised by default on several processes
    (["--batch-norm", "--no-sync-bn"], 2, "BatchNorm2d"),   # each process normalises its own rows
    (["--batch-norm"], 1, "BatchNorm2d"),                   # nothing to synchronise with
])
def test_batchnorm_is_synchronised_only_where_it_should_be(flags, processes, kind):
    from types import SimpleNamespace

    from vgg_dist.config import parse_config
    from vgg_dist.training.setup import build_model_and_optimizer
    config = parse_config([*TINY_MODEL, *flags], prog="train", description="test")
    layout = SimpleNamespace(num_processes=processes, device=torch.device("cpu"))
    model, _ = build_model_and_optimizer(layout, config, config.model_spec(1, 10))
    kinds = {type(module).__name__ for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)}
    assert kinds == {kind}


@pytest.mark.slow
def test_resume_on_fewer_processes_continues_the_same_run(two_process_run, tiny_data, tmp_path):
    # The global batch is the same, so 2 -> 1 processes recomputes the same data order and takes the same
    # steps; without dropout only the reduction order differs (a wrong order moves weights by ~1e-2).
    run_dir = shutil.copytree(two_process_run, tmp_path / "run")
    (run_dir / "model.safetensors").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step_0000002")
    _, stdout, _ = train_here(tmp_path, tiny_data, *EQUIVALENCE, "--resume", "auto")
    assert "global step 1" in stdout
    ours, theirs = read_weights(run_dir), read_weights(two_process_run)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5, msg=name)
    resumed, reference = read_metrics(run_dir)[0], read_metrics(two_process_run)[0]
    assert resumed["train_samples"] == 64 and resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_bf16_gradient_all_reduce_is_applied_and_stays_close(two_process_run, tiny_data, tmp_path):
    rounded, _ = train(tmp_path, tiny_data, *EQUIVALENCE, "--ddp-bf16-grads", num_processes=2, name="bf16_grads")
    exact_weights, rounded_weights = read_weights(two_process_run), read_weights(rounded)
    assert any(not torch.equal(exact_weights[name], rounded_weights[name]) for name in exact_weights)
    for name in exact_weights:  # bf16 keeps ~3 significant digits of each gradient
        torch.testing.assert_close(rounded_weights[name], exact_weights[name], rtol=0.05, atol=2e-3, msg=name)


@pytest.mark.slow
def test_a_short_run_learns_and_moves_every_layer(tmp_path, learnable_data):
    run_dir, stdout, _ = train_here(tmp_path, learnable_data, "--image-size", "32", "--width-divisor", "8",
                                    "--hidden-size", "128", "--batch-norm", "--epochs", "3", "--batch-size", "32")
    metrics = read_metrics(run_dir)
    assert metrics[-1]["test_acc"] > 0.6, metrics[-1]  # chance is 0.1
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    from vgg_dist.model import ModelSpec, build_model
    torch.manual_seed(0)
    initial = build_model(ModelSpec(width_divisor=8, image_size=32, hidden_size=128, batch_norm=True)).state_dict()
    trained = read_weights(run_dir)
    assert all(not torch.equal(initial[name], trained[name]) for name in initial if "num_batches" not in name)
    assert "train epoch" not in stdout  # no progress bar when stdout is not a terminal


def test_bad_flag_contract_one_line_exit_2_nothing_created(tmp_path, tiny_data):
    result = run_bounded([sys.executable, TRAIN_SCRIPT, "--data-dir", str(tiny_data), "--output-dir",
                          str(tmp_path / "run"), "--epochs", "0"], timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: --epochs must be a positive integer, got 0\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_multi_process_failure_names_its_cause_at_the_end(tmp_path, tiny_data):
    command = launch_command(2, TRAIN_SCRIPT, "--data-dir", str(tiny_data), *TINY_MODEL, "--batch-size", "7",
                             "--output-dir", str(tmp_path / "run"))
    result = run_bounded(command, timeout=120)
    message = "error: --batch-size 7 does not split evenly over 2 processes; use a multiple of 2"
    assert result.returncode != 0
    assert result.stderr.startswith(message + "\n")  # rank 0's own line, first
    # ...and again as the root cause at the very end of torchrun's report, instead of a stack trace.
    assert f"traceback : {message}" in result.stderr[result.stderr.rindex("Root Cause"):]
    assert not (tmp_path / "run").exists()


def test_existing_run_is_never_overwritten(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.safetensors").write_bytes(b"precious")
    _, _, stderr = train_here(tmp_path, tiny_data, *TINY_MODEL, expect=2)
    assert "--output-dir" in stderr and "already exists" in stderr
    assert (run_dir / "model.safetensors").read_bytes() == b"precious"


def test_fp16_without_a_gpu_is_refused(tmp_path, tiny_data, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, where fp16 is valid")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    _, _, stderr = train_here(tmp_path, tiny_data, *TINY_MODEL, expect=2)
    assert stderr == "error: --mixed_precision fp16 needs a GPU and none is visible; use bf16 or no on CPU\n"


def test_no_data_anywhere_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from vgg_dist.train import main
    code, _, stderr = run_main(main, ["--output-dir", str(tmp_path / "run"), *TINY_MODEL])
    assert code == 2 and stderr.count("\n") == 1 and "pass --data-dir DIR" in stderr and "HF_HUB_OFFLINE=1" in stderr
    assert not (tmp_path / "run").exists()


def test_a_huge_model_is_refused_before_anything_is_allocated(tmp_path, tiny_data):
    _, _, stderr = train_here(tmp_path, tiny_data, "--hidden-size", "1000000000000", expect=2)
    assert stderr.startswith("error: the model has 1,000,000,") and "lower --hidden-size" in stderr


def test_divergence_ends_with_exit_3_not_a_traceback(tmp_path, tiny_data):
    _, _, stderr = train_here(tmp_path, tiny_data, *TINY_MODEL, "--lr", "1e30", "--batch-size", "32", expect=3)
    assert stderr.startswith("error: non-finite loss or weights at step") and "Traceback" not in stderr


def chapter_by_hand(data_dir, steps: int, batch_size: int) -> dict[str, torch.Tensor]:
    """d2l's training loop written out plainly: the chapter's model, seeded as a run seeds it, plain SGD at
    0.05 on cross-entropy, the run's batch order, each batch resized on the device and scaled to [0, 1]."""
    import torch.nn.functional as F
    from accelerate.utils import set_seed
    from vgg_dist.data.batches import EpochBatchSampler
    from vgg_dist.data.sources import DATASETS, load_from_dir
    from vgg_dist.model import ModelSpec, build_model
    train_split = load_from_dir(data_dir, DATASETS["fashion_mnist"].class_names).train
    spec = ModelSpec(width_divisor=16, hidden_size=64, image_size=32)
    set_seed(0)
    model = build_model(spec).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    set_seed(0)  # the dropout stream of process 0 (a run adds the process index to the seed)
    sampler = EpochBatchSampler(len(train_split), batch_size, shuffle=True, drop_last=True, seed=0)
    for batch in list(sampler)[:steps]:
        index = torch.as_tensor(batch)
        x = F.interpolate(train_split.images[index].float(), size=(32, 32), mode="bilinear", align_corners=False)
        x = x.mul_(1.0 / 255.0).contiguous(memory_format=torch.channels_last).as_strided((len(batch), 1, 32, 32),
                                                                                          (32 * 32, 1, 32, 1))
        loss = F.cross_entropy(model(x), train_split.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {name: value.detach() for name, value in model.state_dict().items()}


def test_the_chapter_recipe_is_exactly_the_chapters_plain_loop(tmp_path, tiny_data):
    """Nothing vgg_dist adds (normalisation, the cache, augmentation, mixing, accumulation) touches the
    chapter's arithmetic: its weights after a few steps are bitwise those of the plain loop."""
    batch_size = 8
    run_dir, _, _ = train_here(tmp_path, tiny_data, *TINY_MODEL, "--epochs", "1", "--batch-size", str(batch_size))
    steps = json.loads((run_dir / "config.json").read_text())["final_metrics"]["global_step"]
    expected = chapter_by_hand(tiny_data, steps, batch_size)
    trained = read_weights(run_dir)
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(trained[name], value), name
