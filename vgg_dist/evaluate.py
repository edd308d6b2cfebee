"""Test accuracy of a trained model: a run's final weights, or any of its checkpoints.

    python -m vgg_dist.evaluate --checkpoint runs/20261126-120000
    python -m vgg_dist.evaluate --checkpoint runs/20261126-120000/checkpoints/best
    accelerate launch --multi_gpu --num_processes 2 -m vgg_dist.evaluate --checkpoint RUN_DIR

Prints one JSON object with test_acc, test_loss and test_samples. By default it reads the same data
the run trained on (its --dataset, --data-dir and --max-eval-samples); flags here override them.
"""

from __future__ import annotations

import argparse
import json

import torch

from vgg_dist import artifacts
from vgg_dist.accelerated import check_layout, evaluate, finish, make_accelerator, make_loader
from vgg_dist.cli import FlagParser, check_positive
from vgg_dist.data import EpochBatchSampler, load_dataset
from vgg_dist.errors import UsageError, exit_process, exits_cleanly_on_stop
from vgg_dist.metrics import accuracy, sample_count
from vgg_dist.model import ModelSpec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = FlagParser(prog="python -m vgg_dist.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run directory (its final model.safetensors), one of its checkpoints "
                             "(RUN/checkpoints/step_N), or RUN/checkpoints/best")
    parser.add_argument("--data-dir", help="directory of IDX files (default: the run's own data source)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global evaluation batch (default: the run's --batch-size)")
    parser.add_argument("--max-eval-samples", type=int, default=None,
                        help="first N test images (default: the run's own setting)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_eval_samples"):
        check_positive(name, getattr(args, name))
    return args


@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, run_config = artifacts.load_model(args.checkpoint)
    spec = ModelSpec.from_dict(run_config["model"])
    flags = run_config.get("flags", {})
    data_dir = args.data_dir if args.data_dir is not None else flags.get("data_dir")
    max_eval = args.max_eval_samples if args.max_eval_samples is not None else flags.get("max_eval_samples")
    batch_size = args.batch_size or flags.get("batch_size", 128)

    accelerator = make_accelerator()
    check_layout(accelerator, batch_size)
    with accelerator.main_process_first():
        data = load_dataset(run_config.get("dataset", "fashion_mnist"), data_dir)
    if data.in_channels != spec.in_channels or len(data.class_names) != spec.num_classes:
        raise UsageError(f"--data-dir {data_dir}: its images/classes do not match the model in {args.checkpoint}")
    test = data.test.head(max_eval)
    channels_last = flags.get("channels_last", True)  # the layout training evaluated in, for identical numbers
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = make_loader(test, EpochBatchSampler(len(test), batch_size, shuffle=False, drop_last=False),
                         accelerator.device)
    model, loader = accelerator.prepare(model, loader)
    confusion, test_loss = evaluate(accelerator, model, loader, spec.image_size, spec.num_classes, channels_last)
    if accelerator.is_main_process:
        print(json.dumps({"test_acc": accuracy(confusion), "test_loss": test_loss,
                          "test_samples": sample_count(confusion), "checkpoint": str(args.checkpoint)}))
    finish(accelerator)
    return 0


if __name__ == "__main__":
    exit_process(main())
