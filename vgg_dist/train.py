"""Train d2l's VGG on Fashion-MNIST with Hugging Face Accelerate: CPU, one GPU, many GPUs, many nodes.

    accelerate launch vgg_dist/train.py --data-dir data/fashion_mnist                # one process
    accelerate launch --multi_gpu --num_processes 8 vgg_dist/train.py               # all GPUs of a node
    accelerate launch --mixed_precision bf16 vgg_dist/train.py                        # bf16 autocast
    accelerate launch --multi_gpu --num_processes 2 vgg_dist/train.py --epochs 1    # 2 CPU processes (gloo)

This is the only module that imports Accelerate: the model, the data and the artifacts are plain
PyTorch, and `vgg_dist.evaluate` reuses `make_accelerator` and `evaluate` from here.
"""

from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`accelerate launch vgg_dist/train.py`): put the repository on the path instead of
    # this folder, so `vgg_dist` is importable and its modules cannot shadow top-level ones.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, set_seed

from vgg_dist import artifacts
from vgg_dist.config import TrainConfig, parse_config
from vgg_dist.data import BatchIndexedTensors, EpochBatchSampler, Split, keep_batch, load_dataset, to_model_input
from vgg_dist.errors import UsageError, exits_cleanly_on_usage_error
from vgg_dist.model import ModelSpec, build_model, count_parameters


def make_accelerator() -> Accelerator:
    """An Accelerator whose dataloaders take GLOBAL batches and split them across processes.

    Without a GPU it is built with cpu=True: that is what turns `accelerate launch --multi_gpu
    --num_processes N` into one N-process gloo job instead of N independent runs.
    """
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=True),
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate would silently train in fp32 here; say so instead.
        raise UsageError("--mixed_precision fp16 needs a GPU and none is visible; use bf16 or no on CPU")
    return accelerator


def check_layout(accelerator: Accelerator, batch_size: int) -> None:
    processes = accelerator.num_processes
    if batch_size % processes:
        raise UsageError(f"--batch-size {batch_size} does not split evenly over {processes} processes; "
                         f"use a multiple of {processes}")


def make_loader(split: Split, sampler: EpochBatchSampler, pin_memory: bool) -> torch.utils.data.DataLoader:
    # The whole dataset is a few tensors in memory and a batch is one index op, so worker processes
    # would only add inter-process copies.
    return torch.utils.data.DataLoader(BatchIndexedTensors(split), batch_sampler=sampler,
                                       collate_fn=keep_batch, pin_memory=pin_memory)


def train_epoch(accelerator: Accelerator, model, optimizer, loader, image_size: int,
                channels_last: bool) -> dict[str, float]:
    """One pass in the chapter's order; loss and accuracy accumulate on the device and are reduced
    across processes once, at the end, so no step waits on the host."""
    model.train()
    device = accelerator.device
    # float64 keeps the counts exact far beyond an epoch of Fashion-MNIST.
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, samples
    for images, labels in loader:
        logits = model(to_model_input(images, image_size, channels_last))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        batch = labels.shape[0]
        totals[0] += loss.detach() * batch
        totals[1] += (logits.detach().argmax(dim=1) == labels).sum()
        totals[2] += batch
    loss_sum, correct, samples = accelerator.reduce(totals, reduction="sum").tolist()
    return {"train_loss": loss_sum / samples, "train_acc": correct / samples, "train_samples": int(samples)}


def evaluate(accelerator: Accelerator, model, loader, image_size: int, num_classes: int,
             channels_last: bool) -> torch.Tensor:
    """Confusion matrix [true, predicted] over the whole test set, on every process.

    `gather_for_metrics` drops the samples Accelerate repeats to even out the last batch, so each test
    image counts exactly once whatever the number of processes.
    """
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=accelerator.device)
    with torch.no_grad():
        for images, labels in loader:
            predictions = model(to_model_input(images, image_size, channels_last)).argmax(dim=1)
            predictions, labels = accelerator.gather_for_metrics((predictions, labels))
            confusion += torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    return confusion.view(num_classes, num_classes)


def accuracy(confusion: torch.Tensor) -> tuple[float, int]:
    total = int(confusion.sum())
    return (int(confusion.trace()) / total if total else 0.0), total


def claim_run_dir(accelerator: Accelerator, output_dir: str | None) -> Path:
    """The main process creates the run directory; every process learns its name."""
    chosen = [None]
    if accelerator.is_main_process:
        if output_dir is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            path, suffix = Path("runs") / stamp, 1
            while path.exists():
                path, suffix = Path("runs") / f"{stamp}-{suffix}", suffix + 1
        else:
            path = Path(output_dir)
        path.mkdir(parents=True, exist_ok=True)
        chosen = [str(path)]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


def use_channels_last(device: torch.device) -> bool:
    # cuDNN's fastest convolutions (tensor cores) want NHWC; on CPU NCHW is as fast or faster.
    return device.type == "cuda"


def run_header(accelerator: Accelerator, config: TrainConfig, spec: ModelSpec, model, run_dir: Path) -> str:
    processes = accelerator.num_processes
    backend = accelerator.state.backend or "none"
    return (f"vgg_dist: {spec.arch} / {spec.width_divisor}, {count_parameters(model):,} parameters, "
            f"{spec.image_size}x{spec.image_size} input\n"
            f"  {processes} process{'es' if processes > 1 else ''} on {accelerator.device.type} "
            f"(backend {backend}), global batch {config.batch_size} = {processes} x "
            f"{config.batch_size // processes} per process, mixed precision {accelerator.mixed_precision}\n"
            f"  run directory {run_dir}")


@exits_cleanly_on_usage_error
def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv, prog="accelerate launch vgg_dist/train.py", description=__doc__.splitlines()[0])
    accelerator = make_accelerator()
    check_layout(accelerator, config.batch_size)

    with accelerator.main_process_first():  # the main process downloads, the others read its cache
        data = load_dataset(config.dataset, config.data_dir)
    train_split, test_split = data.train.head(config.max_train_samples), data.test.head(config.max_eval_samples)
    if len(train_split) < config.batch_size:
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(train_split)} training "
                         f"images; lower it or raise --max-train-samples")
    spec = config.model_spec(in_channels=data.in_channels, num_classes=len(data.class_names))

    set_seed(config.seed)  # the same initial weights on every process
    model = build_model(spec)
    channels_last = use_channels_last(accelerator.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    # Whole global batches only: every optimizer step sees exactly --batch-size images on any world size.
    train_sampler = EpochBatchSampler(len(train_split), config.batch_size, shuffle=True, drop_last=True,
                                      seed=config.seed)
    test_sampler = EpochBatchSampler(len(test_split), config.batch_size, shuffle=False, drop_last=False)
    pin_memory = accelerator.device.type == "cuda"
    train_loader = make_loader(train_split, train_sampler, pin_memory)
    test_loader = make_loader(test_split, test_sampler, pin_memory)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    set_seed(config.seed, device_specific=True)  # a different dropout stream on each process

    accelerator.wait_for_everyone()  # every process has validated the output dir before it is created
    run_dir = claim_run_dir(accelerator, config.output_dir)
    run_info = {
        "model": artifacts.spec_dict(spec),
        "class_names": list(data.class_names),
        "dataset": config.dataset,
        "data_source": data.source,
        "train_samples": len(train_split),
        "test_samples": len(test_split),
        "flags": config.to_dict(),
        "launch": {"num_processes": accelerator.num_processes, "device": accelerator.device.type,
                   "mixed_precision": accelerator.mixed_precision},
        "final_metrics": None,
    }
    if accelerator.is_main_process:
        artifacts.write_json(run_dir / artifacts.CONFIG_NAME, run_info)
    accelerator.print(run_header(accelerator, config, spec, model, run_dir))

    trained_samples, train_seconds, record = 0, 0.0, {}
    for epoch in range(config.epochs):
        train_sampler.set_epoch(epoch)
        started = time.perf_counter()
        train_metrics = train_epoch(accelerator, model, optimizer, train_loader, spec.image_size, channels_last)
        seconds = time.perf_counter() - started  # `.tolist()` above waited for the device
        started = time.perf_counter()
        test_acc, test_samples = accuracy(evaluate(accelerator, model, test_loader, spec.image_size,
                                                   spec.num_classes, channels_last))
        eval_seconds = time.perf_counter() - started
        trained_samples += train_metrics["train_samples"]
        train_seconds += seconds
        record = {"epoch": epoch + 1, **train_metrics, "test_acc": test_acc, "test_samples": test_samples,
                  "examples_per_sec": train_metrics["train_samples"] / seconds, "seconds": seconds,
                  "eval_seconds": eval_seconds}
        accelerator.print(f"epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.3f}, "
                          f"train acc {record['train_acc']:.3f}, test acc {test_acc:.3f}, "
                          f"{record['examples_per_sec']:.1f} examples/sec")
        if accelerator.is_main_process:
            artifacts.append_jsonl(run_dir / artifacts.METRICS_NAME, record)

    if accelerator.is_main_process:
        weights = accelerator.unwrap_model(model).state_dict()
        artifacts.save_weights(run_dir / artifacts.WEIGHTS_NAME, weights, spec)
        run_info["final_metrics"] = record
        artifacts.write_json(run_dir / artifacts.CONFIG_NAME, run_info)
    examples_per_sec = trained_samples / train_seconds
    accelerator.print(f"loss {record['train_loss']:.3f}, train acc {record['train_acc']:.3f}, "
                      f"test acc {record['test_acc']:.3f}")
    accelerator.print(f"{examples_per_sec:.1f} examples/sec on {accelerator.device} "
                      f"({accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
