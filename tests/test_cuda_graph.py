"""--cuda-graphs. A CPU cannot record a CUDA graph, so these tests give GraphedUpdate a recorder that
replays by running the recorded function again: everything else (the eager steps, the static input
buffers, the learning rate read from a tensor, the outputs overwritten in place) runs as on a GPU."""

import pytest
import torch

from conftest import TINY_MODEL, isolated_run
from vgg_dist.config import parse_config
from vgg_dist.errors import UsageError
from vgg_dist.training.cuda_graph import EAGER_STEPS, GraphedUpdate
from vgg_dist.training.dist import make_accelerator
from vgg_dist.training.loop import Run, train_step, update
from vgg_dist.training.optim import ModelEMA, make_sgd
from vgg_dist.training.setup import build_model_and_optimizer, check_cuda_graphs, make_augmenter, make_schedule
from vgg_dist.training.state import TrainState

EVERY_FEATURE = [*TINY_MODEL, "--batch-norm", "--dropout", "0.3", "--batch-size", "8", "--lr", "0.1",
                 "--lr-schedule", "onecycle", "--warmup-epochs", "1", "--epochs", "2", "--momentum", "0.9",
                 "--nesterov", "--weight-decay", "0.01", "--label-smoothing", "0.1", "--clip-grad-norm", "1.0",
                 "--random-crop-padding", "2", "--hflip", "0.5", "--random-erase", "0.5", "--model-ema",
                 "--auto-augment", "rand-m9-n2"]
STEPS = 10


def _config(*flags):
    return parse_config(list(flags), prog="t", description="t")


def _train(graphed: bool, fused: bool) -> tuple[TrainState, dict]:
    """STEPS steps with every feature on, through train_step; `graphed` replays `update` from a recording.
    `fused`: the fused SGD a GPU gets (the CPU has one too), which reads the recording's tensor lr."""
    config = _config(*EVERY_FEATURE)
    recorded = {"recordings": 0, "replays": 0}

    def record(step):
        recorded["recordings"] += 1

        def replay():
            recorded["replays"] += 1
            step()
        return replay

    with isolated_run():
        accelerator = make_accelerator()
        model, optimizer = build_model_and_optimizer(accelerator, config, config.model_spec(1, 10))
        if fused:
            optimizer = make_sgd(model, config.lr, config.momentum, config.nesterov, config.weight_decay, fused=True)
        ema = ModelEMA(model, config.model_ema_decay)
        model, optimizer = accelerator.prepare(model, optimizer)
        state = TrainState(accelerator=accelerator, model=model, optimizer=optimizer, ema=ema, seed=config.seed)
        run = Run(config=config, spec=config.model_spec(1, 10), schedule=make_schedule(config, STEPS // 2),
                  augment=make_augmenter(accelerator, config))
        step_update = lambda *batch: update(state, run, *batch)  # noqa: E731
        if graphed:
            step_update = GraphedUpdate(step_update, optimizer, accelerator.device, record)
        data = torch.Generator().manual_seed(1)
        for step in range(STEPS):
            state.progress.epoch, state.progress.step_in_epoch = divmod(step, STEPS // 2)
            images = torch.randint(0, 256, (8, 1, 28, 28), generator=data, dtype=torch.uint8)
            train_step(state, run, step_update, images, torch.randint(0, 10, (8,), generator=data))
    return state, recorded


@pytest.mark.parametrize("fused", [False, True], ids=["foreach_sgd", "fused_sgd"])
@pytest.mark.slow
def test_a_graphed_step_trains_exactly_like_an_eager_one(fused):
    eager, _ = _train(graphed=False, fused=fused)
    graphed, recorded = _train(graphed=True, fused=fused)
    assert all(bool(group["fused"]) is fused for group in graphed.optimizer.param_groups)
    assert recorded == {"recordings": 1, "replays": STEPS - EAGER_STEPS}
    # The schedule changes the rate every step: a recording that kept its first rate would drift here.
    for name, value in eager.model.state_dict().items():  # weights and BatchNorm's running statistics
        assert torch.equal(value, graphed.model.state_dict()[name]), name
    for mine, theirs in zip(eager.optimizer.state_dict()["state"].values(),
                            graphed.optimizer.state_dict()["state"].values()):
        assert torch.equal(mine["momentum_buffer"], theirs["momentum_buffer"])
    for name, value in eager.ema.state_dict().items():
        assert torch.equal(value, graphed.ema.state_dict()[name]), name
    assert torch.equal(eager.sums.values, graphed.sums.values)
    assert graphed.sums.values[2].item() == STEPS * 8
    # Outside a recording the groups hold plain numbers, which checkpoints store.
    assert all(isinstance(group["lr"], float) for group in graphed.optimizer.param_groups)


def test_after_recording_each_replay_overwrites_the_same_output_tensors():
    calls = []

    def fake_update(images, labels, draws):
        calls.append(images.clone())
        return images.float().sum(), labels.float() * 2

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    graphed = GraphedUpdate(fake_update, optimizer, torch.device("cpu"), record=lambda step: step)
    outputs = [graphed(torch.full((2,), float(i)), torch.tensor([i, i + 1]), None) for i in range(EAGER_STEPS + 3)]
    replayed = outputs[EAGER_STEPS:]
    assert all(loss is replayed[0][0] and logits is replayed[0][1] for loss, logits in replayed)
    last = EAGER_STEPS + 2  # the last batch, copied into the static inputs before the replay
    assert replayed[-1][0].item() == 2 * last and torch.equal(replayed[-1][1], 2 * torch.tensor([last, last + 1.0]))
    assert len(calls) == EAGER_STEPS + 3 and torch.equal(calls[-1], torch.full((2,), float(last)))


def test_cuda_graphs_refuses_the_launches_it_cannot_record():
    with isolated_run():
        accelerator = make_accelerator(cuda_graphs=True)
        assert accelerator.autocast_handler.cache_enabled is False  # a recording may not use autocast's cache
        with pytest.raises(UsageError, match="--cuda-graphs needs a GPU"):
            check_cuda_graphs(accelerator, _config("--cuda-graphs"))
        with pytest.raises(UsageError, match="reduce-overhead both record CUDA graphs"):
            check_cuda_graphs(accelerator, _config("--cuda-graphs", "--compile-mode", "reduce-overhead"))
        check_cuda_graphs(accelerator, _config())  # off: nothing to refuse


def test_training_with_cuda_graphs_on_a_cpu_stops_in_one_line_before_any_work(tmp_path, tiny_data):
    from conftest import run_main
    from vgg_dist.train import main
    code, stdout, stderr = run_main(main, ["--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "run"),
                                           *TINY_MODEL, "--cuda-graphs"])
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "--cuda-graphs needs a GPU and none is visible" in stderr
    assert not (tmp_path / "run").exists() and stdout == ""
