"""Gradient accumulation: any processes x micro-batches of the same global batch take the same steps,
resume exactly, and all-reduce once per optimizer step. AdamW: decoupled decay on weights only, an exact
resume, and no resume with another optimizer. MixUp/CutMix: partners from the global batch, the same on 1
and 2 processes, soft targets that combine with label smoothing, an exact resume. Bad values are refused
in one line."""

import json
import os
import signal
import textwrap
import types

import pytest
import torch

from conftest import REPO, TINY_MODEL, launch_command, read_weights, run_bounded, train_here
from conftest import stopped_copy
from test_checkpoint import assert_same_bits
import torch.nn.functional as F

from vgg_dist.config import parse_config
from vgg_dist.data.augment import Augmentation, BatchAugmenter
from vgg_dist.data.mix import CUTMIX, Mixing, mix_batch
from vgg_dist.errors import EXIT_PREEMPTED, EXIT_USAGE, UsageError
from vgg_dist.model import build_model
from vgg_dist.store import checkpoint
from vgg_dist.training import loop
from vgg_dist.training.dist import check_layout
from vgg_dist.training.setup import make_optimizer

# No BatchNorm (its statistics are per micro-batch) and no dropout (its masks are per process), so that
# 1 x K=1, 1 x K=2, 2 x K=1 and 2 x K=2 take the same steps; augmentation on, so that each image must keep
# its draw whichever micro-batch it lands in. 128 images in 8 steps of 16.
SAME_STEPS = [*TINY_MODEL, "--dropout", "0", "--epochs", "1", "--max-train-samples", "128", "--max-eval-samples",
              "16", "--batch-size", "16", "--momentum", "0.9", "--random-crop-padding", "2", "--hflip", "0.5",
              "--random-erase", "0.5", "--clip-grad-norm", "5"]
STEPS = 8

# Counts DDP's all-reduces: a comm hook sees every gradient bucket that DDP reduces, and the last bucket of
# a backward once per reduction; no_sync skips the hook altogether.
COUNTING_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {repo!r})
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    import vgg_dist.train as train

    reductions = [0]

    def counting(process_group, bucket):
        reductions[0] += bool(bucket.is_last())
        return allreduce_hook(process_group, bucket)

    built = train.build_training

    def build_and_hook(*args):
        state, run = built(*args)
        state.model.register_comm_hook(None, counting)
        return state, run

    train.build_training = build_and_hook
    code = train.main(sys.argv[1:])
    with open(os.path.join({out!r}, "rank" + os.environ["RANK"] + ".json"), "w") as handle:
        json.dump({{"reductions": reductions[0]}}, handle)
    sys.exit(code)
""")


def counted_run(tmp_path, data_dir, name, *args):
    """Two real processes, counting each one's all-reduces: (run directory, reductions per rank)."""
    out = tmp_path / f"{name}-counts"
    out.mkdir()
    script = tmp_path / "counting_train.py"
    script.write_text(COUNTING_SCRIPT.format(repo=str(REPO), out=str(out)))
    run_dir = tmp_path / name
    result = run_bounded(launch_command(2, str(script), "--data-dir", str(data_dir), "--output-dir", str(run_dir),
                                        *args), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "in 2 micro-batches" in result.stdout or "--grad-accum-steps" not in args
    counts = [json.loads((out / f"rank{rank}.json").read_text())["reductions"] for rank in (0, 1)]
    return run_dir, counts


def assert_close_weights(run_dir, reference_dir):
    ours, theirs = read_weights(run_dir), read_weights(reference_dir)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_processes_times_micro_batches_take_the_same_steps(tiny_data, tmp_path):
    one, _, _ = train_here(tmp_path, tiny_data, *SAME_STEPS, name="1x1")
    accumulated, stdout, _ = train_here(tmp_path, tiny_data, *SAME_STEPS, "--grad-accum-steps", "2", name="1x2")
    assert "16 = 1 x 16 per process in 2 micro-batches" in stdout
    two, two_counts = counted_run(tmp_path, tiny_data, "2x1", *SAME_STEPS)
    both, both_counts = counted_run(tmp_path, tiny_data, "2x2", *SAME_STEPS, "--grad-accum-steps", "2")
    for run_dir in (accumulated, two, both):
        assert_close_weights(run_dir, one)
    # One all-reduce per optimizer step on every rank, with or without accumulation.
    assert two_counts == both_counts == [STEPS, STEPS]


RESUMED = [*TINY_MODEL, "--epochs", "2", "--max-train-samples", "128", "--max-eval-samples", "16", "--batch-size",
           "16", "--batch-norm", "--hflip", "0.5", "--random-crop-padding", "2", "--model-ema", "--checkpoint-every",
           "3", "--keep-last", "0"]
ACCUMULATING_SGD = ["--grad-accum-steps", "2", "--momentum", "0.9"]
MIXING = ["--mixup", "0.4", "--cutmix", "1.0", "--mix-prob", "0.9", "--label-smoothing", "0.1", "--momentum", "0.9"]
ADAMW = ["--optimizer", "adamw", "--lr", "0.002", "--beta1", "0.8", "--beta2", "0.99", "--weight-decay", "0.05"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [ACCUMULATING_SGD, ADAMW, MIXING], ids=["sgd-accumulating", "adamw", "mixing"])
def test_a_resume_is_bitwise(tiny_data, tmp_path, optimizer):
    """Stopped after step 6 of 16 (mid-epoch; with accumulation a window is never split: checkpoints fall
    between optimizer steps). The optimizer's state (momentum, or AdamW's moments and step) is compared too."""
    reference, _, _ = train_here(tmp_path, tiny_data, *RESUMED, *optimizer, name="reference")
    stopped_copy(reference, tmp_path / "resumed", last_step=6)
    _, stdout, _ = train_here(tmp_path, tiny_data, *RESUMED, *optimizer, "--resume", "auto", name="resumed")
    assert "step_0000006" in stdout
    assert_same_bits(tmp_path / "resumed", reference)


@pytest.mark.slow
def test_a_stop_signal_mid_window_checkpoints_at_the_window_end_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """SIGTERM arrives during the first micro-batch of step 4: the window is finished, step 4 checkpointed,
    and the resumed run ends with the uninterrupted run's bits."""
    args = [*RESUMED, *ACCUMULATING_SGD, "--sync-every", "1"]
    reference, _, _ = train_here(tmp_path, tiny_data, *args, name="reference")
    calls, real = [0], loop.forward_backward

    def signalled_mid_window(*arguments):
        calls[0] += 1
        if calls[0] == 7:  # micro-batch 1 of 2 in step 4
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*arguments)

    monkeypatch.setattr(loop, "forward_backward", signalled_mid_window)
    run_dir, stdout, _ = train_here(tmp_path, tiny_data, *args, name="stopped", expect=EXIT_PREEMPTED)
    assert calls[0] == 8  # the window's second micro-batch ran; no step after it
    assert "step_0000004 written" in stdout
    assert checkpoint.list_checkpoints(run_dir / "checkpoints")[-1].name == "step_0000004"
    monkeypatch.setattr(loop, "forward_backward", real)
    train_here(tmp_path, tiny_data, *args, "--resume", "auto", name="stopped")
    assert_same_bits(run_dir, reference)


def test_a_resume_with_another_optimizer_is_refused(tiny_data, tmp_path):
    """SGD without momentum saves no per-parameter state, so only the flag can tell the two apart."""
    short_run = [*TINY_MODEL, "--epochs", "1", "--max-train-samples", "32", "--max-eval-samples", "16",
                 "--batch-size", "16"]
    train_here(tmp_path, tiny_data, *short_run, name="run")
    _, _, stderr = train_here(tmp_path, tiny_data, *short_run, "--optimizer", "adamw", "--resume", "auto",
                              name="run", expect=EXIT_USAGE)
    assert stderr.count("\n") == 1 and "was trained with --optimizer sgd, not adamw" in stderr


def test_adamw_decays_weights_decoupled_and_never_biases_or_batchnorm():
    """With a zero gradient AdamW's moments stay 0, so a step is the decoupled decay alone:
    weights x (1 - lr x decay); L2 decay through the gradient would instead move them by about lr."""
    config = parse_config([*TINY_MODEL, "--batch-norm", "--optimizer", "adamw", "--lr", "0.01", "--beta1", "0.8",
                           "--weight-decay", "0.1"], prog="test", description="test")
    model = build_model(config.model_spec(1, 10))
    optimizer = make_optimizer(model, config, fused=False)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.8, 0.999)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    for name, parameter in model.named_parameters():
        expected = before[name] * (1 - 0.01 * 0.1) if parameter.dim() > 1 else before[name]
        torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("args, message", [
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be a positive integer, got 0"),
    (["--batch-size", "16", "--grad-accum-steps", "3"], "--batch-size 16 does not split into --grad-accum-steps 3"),
    (["--grad-accum-steps", "2", "--cuda-graphs"], "--cuda-graphs records one whole step and cannot record"),
    (["--optimizer", "adam"], "--optimizer: invalid choice: 'adam'"),
    (["--beta1", "1"], "--beta1 must be in [0, 1), got 1.0"),
    (["--beta2", "-0.1"], "--beta2 must be in [0, 1), got -0.1"),
    (["--mixup", "-1"], "--mixup must be a Beta distribution's alpha, above 0 (or 0: off), got -1.0"),
    (["--cutmix", "nan"], "--cutmix must be a Beta distribution's alpha, above 0 (or 0: off), got nan"),
    (["--mix-prob", "1.5"], "--mix-prob must be in [0, 1], got 1.5"),
    (["--mix-switch-prob", "-0.5"], "--mix-switch-prob must be in [0, 1], got -0.5"),
])
def test_bad_accumulation_is_refused_in_one_line(args, message):
    with pytest.raises(UsageError) as refused:
        parse_config([*TINY_MODEL, *args], prog="test", description="test")
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_batch_that_does_not_split_over_processes_times_micro_batches_is_refused():
    two_processes = types.SimpleNamespace(num_processes=2)
    check_layout(two_processes, 16, 4)  # 2 x 4 micro-batches of 2
    with pytest.raises(UsageError, match=r"^--batch-size 12 does not split over 2 processes x --grad-accum-steps 4 "
                                         r"micro-batches; use a multiple of 8$"):
        check_layout(two_processes, 12, 4)


@pytest.mark.slow
def test_mixing_takes_the_same_steps_on_one_and_two_processes_and_with_accumulation(tiny_data, tmp_path):
    mixing = [*SAME_STEPS, "--mixup", "0.4", "--cutmix", "1.0", "--mix-prob", "0.9", "--label-smoothing", "0.1"]
    one, _, _ = train_here(tmp_path, tiny_data, *mixing, name="1x1")
    accumulated, _, _ = train_here(tmp_path, tiny_data, *mixing, "--grad-accum-steps", "2", name="1x2")
    two, counts = counted_run(tmp_path, tiny_data, "2x1", *mixing)
    for run_dir in (accumulated, two):
        assert_close_weights(run_dir, one)
    assert counts == [STEPS, STEPS]  # gathering the partners is not a gradient all-reduce
    unmixed, _, _ = train_here(tmp_path, tiny_data, *SAME_STEPS, "--label-smoothing", "0.1", name="unmixed")
    with pytest.raises(AssertionError):  # the mixing did happen
        assert_close_weights(unmixed, one)


def test_partners_come_from_the_global_batch_the_same_on_one_and_two_processes():
    """Process p of 2 holds rows 4p..4p+3 of a global batch of 8 and gathers the others' augmented rows."""
    augmentation = Augmentation(crop_padding=2, hflip=0.5, mix=Mixing(mixup=0.4, cutmix=1.0, prob=0.9))
    data = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=data)
    labels = torch.randint(0, 10, (8,), generator=data)
    whole = BatchAugmenter(augmentation, torch.device("cpu"), 3, 0, 1, 8)
    halves = [BatchAugmenter(augmentation, torch.device("cpu"), 3, rank, 2, 8) for rank in (0, 1)]
    kinds = set()
    for step in range(8):
        draws = whole.draw(0, step)
        expected = whole.mix(whole.apply(images, draws), labels, draws, 10, None)
        kinds.add(float(draws["mix"][CUTMIX]))
        half_draws = [half.draw(0, step) for half in halves]
        augmented = [half.apply(images[4 * rank:4 * rank + 4], half_draws[rank]) for rank, half in enumerate(halves)]
        gather = lambda rows: torch.cat(augmented) if rows.dim() == 4 else labels  # noqa: E731
        mixed = [half.mix(augmented[rank], labels[4 * rank:4 * rank + 4], half_draws[rank], 10, gather)
                 for rank, half in enumerate(halves)]
        for index in range(3):  # images, soft targets, dominant labels
            assert torch.equal(torch.cat([mixed[0][index], mixed[1][index]]), expected[index])
        assert not torch.equal(draws["partner"], torch.arange(8))
    assert kinds == {0.0, 1.0}  # both MixUp and CutMix steps were drawn


def test_cutmix_targets_are_the_pasted_share_and_accuracy_counts_the_dominant_label():
    """A box centred near the bottom edge is clipped: the targets follow the pixels actually pasted."""
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    images[1] = 255
    labels = torch.tensor([3, 7])
    draws = {"mix": torch.tensor([0.4, 1.0, 0.95, 0.5], dtype=torch.float64), "partner": torch.tensor([1, 0])}
    mixed, targets, dominant = mix_batch(images, labels, draws, 10, None)
    pasted = (mixed[0] == 255).float().mean()
    assert 0 < pasted < 0.6  # clipped: less than 1 - 0.4
    torch.testing.assert_close(targets[0, 7], pasted)
    torch.testing.assert_close(targets[0].sum(), torch.tensor(1.0))
    assert dominant.tolist() == [3, 7]  # each image is mostly itself


def test_soft_targets_combine_with_label_smoothing_as_mixed_smoothed_losses():
    """Cross-entropy on lam x one-hot(a) + (1 - lam) x one-hot(b) with smoothing s is lam x the smoothed loss
    on a plus (1 - lam) x that on b: timm's mixup_target with smoothing, then soft-target cross-entropy."""
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    first, second, lam = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 1, 9, 0]), 0.3
    targets = lam * F.one_hot(first, 10).float() + (1 - lam) * F.one_hot(second, 10).float()
    expected = (lam * F.cross_entropy(logits, first, label_smoothing=0.1)
                + (1 - lam) * F.cross_entropy(logits, second, label_smoothing=0.1))
    torch.testing.assert_close(F.cross_entropy(logits, targets, label_smoothing=0.1), expected)
