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
from vgg_dist.cli import FlagParser, check_positive, flag
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
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average the predictions on each image and its mirror (default: as the run did)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_eval_samples"):
        check_positive(name, getattr(args, name))
    return args


# The run's settings this command also takes as flags, so a bad one in config.json can be overridden.
OVERRIDABLE = ("data_dir", "batch_size", "max_eval_samples", "tta")


def run_flag(run_config: dict, name: str, kind: type, default):
    """A flag the run was trained with, checked: config.json is a file anyone can edit."""
    value = run_config.get("flags", {}).get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)) or (kind is int and value < 1):
        fix = f"pass {flag(name)} here instead" if name in OVERRIDABLE else f"correct {name} in its config.json"
        raise UsageError(f"--checkpoint: the run's config says {name} is {value!r}, not a "
                         f"{'positive integer' if kind is int else kind.__name__}; {fix}")
    return value


@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, run_config = artifacts.load_model(args.checkpoint)
    spec = ModelSpec.from_dict(run_config["model"])
    data_dir = args.data_dir if args.data_dir is not None else run_flag(run_config, "data_dir", str, None)
    max_eval = (args.max_eval_samples if args.max_eval_samples is not None
                else run_flag(run_config, "max_eval_samples", int, None))
    batch_size = args.batch_size or run_flag(run_config, "batch_size", int, 128)
    channels_last = run_flag(run_config, "channels_last", bool, True)  # the layout training evaluated in
    tta = run_flag(run_config, "tta", bool, False) if args.tta is None else args.tta

    accelerator = make_accelerator()
    check_layout(accelerator, batch_size)
    with accelerator.main_process_first():
        data = load_dataset(run_config.get("dataset", "fashion_mnist"), data_dir)
    if data.in_channels != spec.in_channels or len(data.class_names) != spec.num_classes:
        raise UsageError(f"--data-dir {data_dir}: its images/classes do not match the model in {args.checkpoint}")
    test = data.test.head(max_eval)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = make_loader(test, EpochBatchSampler(len(test), batch_size, shuffle=False, drop_last=False),
                         accelerator.device)
    model, loader = accelerator.prepare(model, loader)
    confusion, test_loss = evaluate(accelerator, model, loader, spec.image_size, spec.num_classes, channels_last, tta)
    if accelerator.is_main_process:
        print(json.dumps({"test_acc": accuracy(confusion), "test_loss": test_loss,
                          "test_samples": sample_count(confusion), "checkpoint": str(args.checkpoint)}))
    finish(accelerator)
    return 0


if __name__ == "__main__":
    exit_process(main())
