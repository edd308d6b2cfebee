"""The pieces the recipes are made of, each shown to do what its flag says: the learning-rate schedule,
on-device augmentation, weight EMA, SGD's parameter groups, synchronised BatchNorm and flip TTA."""

import math
import os

import pytest
import torch
import torch.multiprocessing as multiprocessing
from torch import nn

from conftest import TINY_MODEL, free_port, read_metrics, train_here
from vgg_dist.data.augment import Augmentation, BatchAugmenter, step_seed
from vgg_dist.training.optim import ModelEMA
from vgg_dist.training.optim import LRSchedule, make_sgd


def test_schedules_at_chosen_steps():
    constant = LRSchedule("constant", 0.1, warmup_steps=0, total_steps=100)
    assert [constant(step) for step in (0, 50, 99)] == [0.1, 0.1, 0.1]
    warm = LRSchedule("constant", 0.1, warmup_steps=4, total_steps=100)
    assert [warm(step) for step in range(5)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    cosine = LRSchedule("cosine", 0.1, warmup_steps=10, total_steps=110)
    assert cosine(9) == pytest.approx(0.1) and cosine(10) == pytest.approx(0.1)
    assert cosine(60) == pytest.approx(0.05)  # half-way down the half cosine
    assert cosine(109) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    onecycle = LRSchedule("onecycle", 0.2, warmup_steps=10, total_steps=30)
    assert onecycle(4) == pytest.approx(0.1) and onecycle(20) == pytest.approx(0.1)
    assert onecycle(29) == pytest.approx(0.01)


def test_a_run_follows_its_schedule_and_records_it(tmp_path, tiny_data):
    # 256 images at batch 32: 8 steps per epoch; warm-up 1 epoch, then one-cycle down over the second.
    run_dir, _, _ = train_here(tmp_path, tiny_data, *TINY_MODEL, "--epochs", "2", "--batch-size", "32",
                               "--lr", "0.08", "--lr-schedule", "onecycle", "--warmup-epochs", "1", "--momentum", "0.9",
                               "--no-checkpoint-epochs")
    schedule = LRSchedule("onecycle", 0.08, warmup_steps=8, total_steps=16)
    assert [m["lr"] for m in read_metrics(run_dir)] == pytest.approx([schedule(7), schedule(15)])
    assert read_metrics(run_dir)[0]["lr"] == pytest.approx(0.08)


def _images(count: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 256, (count, 1, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _augment(augmentation: Augmentation, images: torch.Tensor, seed: int = 0, first_row: int = 0,
             global_batch: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step_seed(seed, 0, 0))
    draws = augmentation.draw(generator, global_batch or len(images))
    rows = slice(first_row, first_row + len(images))
    return augmentation.apply(images, {name: values[rows] for name, values in draws.items()})


def test_flip_mirrors_some_images_and_leaves_the_rest():
    images = _images(64)
    out = _augment(Augmentation(hflip=0.5), images)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_crop_translates_each_image_by_at_most_the_padding():
    images = _images(16)
    out = _augment(Augmentation(crop_padding=2), images)
    assert out.shape == images.shape and out.dtype == torch.uint8 and not torch.equal(out, images)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for original, shifted in zip(padded, out):
        assert any(torch.equal(original[:, dy:dy + 28, dx:dx + 28], shifted) for dy in range(5) for dx in range(5))


def test_erasing_zeroes_one_rectangle_per_erased_image():
    images = _images(32)  # no zero pixels to begin with
    out = _augment(Augmentation(erase=1.0), images)
    for original, erased in zip(images, out):
        zero = erased[0] == 0
        rows, cols = zero.any(dim=1).nonzero().flatten(), zero.any(dim=0).nonzero().flatten()
        assert zero.any() and zero.sum() == len(rows) * len(cols)  # exactly a rectangle
        assert torch.equal(erased[0][~zero], original[0][~zero])
        assert 0.02 * 784 * 0.5 <= zero.sum() <= 0.33 * 784 * 1.5


def test_each_process_augments_exactly_its_rows_of_the_global_batch():
    augmentation = Augmentation(crop_padding=2, hflip=0.5, erase=0.5)
    images = _images(16)
    whole = _augment(augmentation, images)
    halves = [_augment(augmentation, images[rows], first_row=rows.start, global_batch=16)
              for rows in (slice(0, 8), slice(8, 16))]
    assert torch.equal(torch.cat(halves), whole)
    augmenter = BatchAugmenter(augmentation, torch.device("cpu"), seed=3, process_index=1, num_processes=2,
                               global_batch=16)
    assert augmenter.rows == slice(8, 16)
    def step(epoch, step_in_epoch):
        return augmenter.apply(images[8:], augmenter.draw(epoch, step_in_epoch))
    assert torch.equal(step(4, 7), step(4, 7))  # reseeded per step
    assert not torch.equal(step(4, 7), step(4, 8))


def test_ema_follows_its_formula_and_differs_from_the_raw_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9)
    expected_weight = model[0].weight.detach().clone()
    expected_mean = model[1].running_mean.clone()
    for step in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model(torch.randn(4, 3))  # training mode: BatchNorm's running statistics and batch count move
        ema.update(step)
        decay = min(0.9, (1 + step) / (10 + step))
        expected_weight = decay * expected_weight + (1 - decay) * model[0].weight.detach()
        expected_mean = decay * expected_mean + (1 - decay) * model[1].running_mean
    torch.testing.assert_close(ema.module[0].weight, expected_weight)
    torch.testing.assert_close(ema.module[1].running_mean, expected_mean)  # averaged like the weights
    assert ema.module[1].num_batches_tracked == 3  # an integer: copied
    assert not torch.allclose(ema.module[0].weight, model[0].weight)
    assert not torch.allclose(ema.module[1].running_mean, model[1].running_mean)


def test_weight_decay_spares_biases_and_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    optimizer = make_sgd(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=False)
    decayed, spared = optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and spared["weight_decay"] == 0.0 and decayed["nesterov"]
    assert [p.dim() for p in decayed["params"]] == [4, 2]
    assert len(spared["params"]) == 4  # conv bias, BatchNorm scale and shift, linear bias
    assert len(make_sgd(model, 0.1, 0.0, False, 0.0, fused=False).param_groups) == 1


def test_tta_averages_the_image_and_its_mirror():
    from vgg_dist.training.dist import evaluate, make_accelerator, make_loader
    from vgg_dist.data.batches import EpochBatchSampler
    from vgg_dist.data.sources import Split
    from vgg_dist.model import ModelSpec, build_model
    from conftest import isolated_run
    with isolated_run():
        accelerator = make_accelerator()
        torch.manual_seed(0)
        spec = ModelSpec(width_divisor=16, image_size=32, hidden_size=32)
        model = build_model(spec).eval()
        images, labels = _images(10), torch.arange(10) % 10
        split = Split(images, labels)
        loader = make_loader(split, EpochBatchSampler(10, 4, shuffle=False, drop_last=False), accelerator.device)
        _, loss = evaluate(accelerator, model, loader, spec, tta=True)
        from vgg_dist.data.batches import to_model_input
        with torch.no_grad():
            x = to_model_input(images, 32)
            mean = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
        assert loss == pytest.approx(float(-mean[torch.arange(10), labels].log().mean()), rel=1e-5)


def _batch_norm_worker(rank: int, port: int, inputs: torch.Tensor, results: dict) -> None:
    import torch.distributed as dist

    from vgg_dist.training.sync_batchnorm import GlobalBatchNorm2d
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    layer = GlobalBatchNorm2d(3)
    part = inputs[rank * 4:(rank + 1) * 4].clone().requires_grad_()
    out = layer(part)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    results[rank] = (out.detach(), part.grad, layer.running_mean, layer.running_var)
    dist.destroy_process_group()


def test_global_batchnorm_on_two_processes_equals_batchnorm_on_the_whole_batch():
    inputs = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    with multiprocessing.Manager() as manager:
        results = manager.dict()
        multiprocessing.spawn(_batch_norm_worker, args=(free_port(), inputs, results), nprocs=2)
        results = dict(results)
    reference = nn.BatchNorm2d(3)
    whole = inputs.clone().requires_grad_()
    out = reference(whole)
    weights = torch.cat([torch.linspace(-1, 1, 4 * 75).view(4, 3, 5, 5)] * 2)
    (out * weights).sum().backward()
    for rank in (0, 1):
        rows = slice(rank * 4, (rank + 1) * 4)
        mine_out, mine_grad, running_mean, running_var = results[rank]
        torch.testing.assert_close(mine_out, out[rows].detach())
        torch.testing.assert_close(mine_grad, whole.grad[rows])
        torch.testing.assert_close(running_mean, reference.running_mean)
        torch.testing.assert_close(running_var, reference.running_var)


def test_train_step_clips_the_gradient_norm_and_smooths_the_labels():
    from conftest import isolated_run
    from vgg_dist.config import parse_config
    from vgg_dist.training.dist import make_accelerator
    from vgg_dist.training.loop import Run, make_update, train_step
    from vgg_dist.training.setup import build_model_and_optimizer, make_schedule
    from vgg_dist.training.state import TrainState

    def one_step(*flags):
        with isolated_run():
            accelerator = make_accelerator()
            config = parse_config([*TINY_MODEL, "--dropout", "0", "--lr", "1.0", *flags], prog="t", description="t")
            model, optimizer = build_model_and_optimizer(accelerator, config, config.model_spec(1, 10))
            model, optimizer = accelerator.prepare(model, optimizer)
            before = [p.detach().clone() for p in model.parameters()]
            state = TrainState(accelerator=accelerator, model=model, optimizer=optimizer, ema=None, seed=config.seed)
            run = Run(config=config, spec=config.model_spec(1, 10), schedule=make_schedule(config, 10))
            train_step(state, run, make_update(state, run), _images(8), torch.arange(8))
            moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
            return moved.norm().item(), state.sums.reduced(accelerator).loss

    free_norm, plain_loss = one_step()
    clipped_norm, _ = one_step("--clip-grad-norm", "0.001")
    _, smoothed_loss = one_step("--label-smoothing", "0.5")
    assert free_norm > 0.01 and clipped_norm == pytest.approx(0.001, rel=1e-3)  # lr 1 x a gradient of norm 0.001
    assert smoothed_loss != pytest.approx(plain_loss)
