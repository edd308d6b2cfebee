"""Fine-tuning controls on a tiny model (neither needs --pretrained): --freeze-features trains only the
classifier and leaves the convolutions and their BatchNorm statistics bitwise as they started;
--feature-lr-scale gives the convolutions their share of the rate; both survive a resume bitwise and a
resume with another value is refused in one line."""

import json

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from conftest import TINY_MODEL, read_metrics, read_weights, saved_state, stopped_copy, train, train_here
from vgg_dist.config import parse_config
from vgg_dist.model import ModelSpec, build_model, feature_layers
from vgg_dist.store import checkpoint
from vgg_dist.training.optim import set_learning_rate
from vgg_dist.training.setup import make_optimizer

# 4 steps an epoch; momentum and weight decay so the optimizer has state and both decay groups
ARGS = [*TINY_MODEL, "--batch-norm", "--epochs", "2", "--batch-size", "16", "--max-train-samples", "64",
        "--max-eval-samples", "16", "--momentum", "0.9", "--weight-decay", "5e-4", "--lr-schedule", "cosine",
        "--keep-last", "0"]
STEPS_PER_EPOCH = 4


def initial_weights(run_dir) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The weights the run started from (the same seeded build as the trainer's), and which are features'."""
    spec = ModelSpec.from_dict(json.loads((run_dir / "config.json").read_text())["model"])
    set_seed(0)
    model = build_model(spec)
    return model.state_dict(), set(feature_layers(model).state_dict())  # a slice keeps the layers' names


def saved_groups(checkpoint_dir) -> list[dict]:
    """The optimizer's parameter groups as a checkpoint's state.json holds them, as plain values."""
    optimizer = checkpoint.join_tensors(saved_state(checkpoint_dir)["optimizer"],
                                        load_file(checkpoint_dir / "optimizer.safetensors"))
    return optimizer["param_groups"]


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, tiny_data):
    run_dir, _, _ = train_here(tmp_path_factory.mktemp("frozen"), tiny_data, *ARGS, "--freeze-features")
    return run_dir


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory, tiny_data):
    run_dir, _, _ = train_here(tmp_path_factory.mktemp("scaled"), tiny_data, *ARGS, "--feature-lr-scale", "0.5")
    return run_dir


def test_frozen_features_stay_bitwise_while_the_classifier_moves(frozen_run):
    (start, features), end = initial_weights(frozen_run), read_weights(frozen_run)
    assert {"0.1.running_mean", "0.1.running_var", "0.1.num_batches_tracked", "4.4.weight"} <= features
    for name in features:  # weights, BatchNorm's weights and its running statistics
        assert torch.equal(end[name], start[name]), name
    classifier = [name for name in start if name not in features]
    assert classifier and all(not torch.equal(end[name], start[name]) for name in classifier)
    groups = saved_groups(checkpoint.list_checkpoints(frozen_run / "checkpoints")[-1])
    assert sum(len(group["params"]) for group in groups) == len(classifier)  # the features are not in it at all


@pytest.mark.slow
def test_frozen_features_stay_bitwise_on_two_processes_with_global_batchnorm(tmp_path, tiny_data):
    """Two processes swap in BatchNorm layers that share statistics across them; freezing comes after, and
    those layers too stay in eval mode."""
    run_dir, _ = train(tmp_path, tiny_data, *ARGS, "--freeze-features", "--epochs", "1", num_processes=2)
    (start, features), end = initial_weights(run_dir), read_weights(run_dir)
    assert all(torch.equal(end[name], start[name]) for name in features)
    assert not torch.equal(end["12.weight"], start["12.weight"])


def test_the_feature_groups_get_their_share_of_the_rate_after_a_step():
    config = parse_config([*ARGS, "--feature-lr-scale", "0.5", "--momentum", "0", "--weight-decay", "0"],
                          prog="test", description="test")
    model = build_model(config.model_spec(1, 10))
    optimizer = make_optimizer(model, config, fused=False)
    set_learning_rate(optimizer, 0.04)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    model(torch.rand(4, 1, 32, 32)).sum().backward()
    optimizer.step()
    in_features = {id(parameter) for parameter in feature_layers(model).parameters()}
    assert [group["lr"] for group in optimizer.param_groups] == [0.02, 0.04]
    for parameter, old in zip(model.parameters(), before):
        rate = 0.02 if id(parameter) in in_features else 0.04
        torch.testing.assert_close(parameter, old - rate * parameter.grad, rtol=0, atol=3e-7)  # float32 rounding
        if rate == 0.02:  # and far from the full rate's update
            assert (parameter - (old - 0.04 * parameter.grad)).abs().max() > 1e-5


def test_a_run_records_the_schedules_rate_and_saves_the_scaled_groups(scaled_run):
    last = checkpoint.list_checkpoints(scaled_run / "checkpoints")[-1]
    groups, flags = saved_groups(last), saved_state(last)["flags"]
    assert [group["lr_scale"] for group in groups] == [0.5, 0.5, 1.0, 1.0]
    assert [group["weight_decay"] for group in groups] == [5e-4, 0.0, 5e-4, 0.0]
    assert groups[0]["lr"] == groups[1]["lr"] == groups[2]["lr"] * 0.5 > 0
    assert flags["feature_lr_scale"] == 0.5
    first_epoch = read_metrics(scaled_run)[0]
    assert first_epoch["lr"] > groups[2]["lr"]  # the schedule's own rate, falling along the cosine


@pytest.mark.parametrize("flags", [["--freeze-features"], ["--feature-lr-scale", "0.5"]])
def test_resume_is_bitwise_with_either_control(flags, frozen_run, scaled_run, tmp_path, tiny_data):
    reference = frozen_run if flags[0] == "--freeze-features" else scaled_run
    run_dir = stopped_copy(reference, tmp_path / "run", last_step=STEPS_PER_EPOCH)
    train_here(tmp_path, tiny_data, *ARGS, *flags, "--resume", "auto")
    ours, theirs = read_weights(run_dir), read_weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    mine, final = (checkpoint.list_checkpoints(path / "checkpoints")[-1] for path in (run_dir, reference))
    assert mine.name == final.name
    momentum, reference_momentum = load_file(mine / "optimizer.safetensors"), load_file(final / "optimizer.safetensors")
    assert momentum and momentum.keys() == reference_momentum.keys()
    assert all(torch.equal(momentum[name], reference_momentum[name]) for name in momentum)
    assert saved_state(mine)["optimizer"] == saved_state(final)["optimizer"]


@pytest.mark.parametrize("flags, message", [
    (["--feature-lr-scale", "0.25"], "was trained with --feature-lr-scale 0.5, not 0.25"),
    ([], "was trained with --feature-lr-scale 0.5, not 1.0"),
    (["--freeze-features"], "was trained without --freeze-features; resume without it"),
])
def test_resume_with_another_value_is_refused_in_one_line(flags, message, scaled_run, tmp_path, tiny_data):
    run_dir = stopped_copy(scaled_run, tmp_path / "run", last_step=STEPS_PER_EPOCH)
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    _, _, stderr = train_here(tmp_path, tiny_data, *ARGS, *flags, "--resume", "auto", expect=2)
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1, stderr
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before


@pytest.mark.parametrize("flags, message", [
    (["--feature-lr-scale", "0"], "--feature-lr-scale must be a positive number"),
    (["--feature-lr-scale", "-1"], "--feature-lr-scale must be a positive number"),
    (["--feature-lr-scale", "nan"], "--feature-lr-scale must be a positive number"),
    (["--feature-lr-scale", "inf"], "--feature-lr-scale must be a positive number"),
    (["--feature-lr-scale", "half"], "--feature-lr-scale: invalid float value"),
    (["--freeze-features", "--feature-lr-scale", "0.5"], "has nothing to scale with --freeze-features"),
])
def test_bad_values_are_one_line_before_any_work(flags, message, tmp_path, tiny_data):
    _, _, stderr = train_here(tmp_path, tiny_data, *TINY_MODEL, *flags, expect=2)
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "run").exists()
