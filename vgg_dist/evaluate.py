"""Test accuracy of a trained model: a run's final weights, or any of its checkpoints.

    python -m vgg_dist.evaluate --checkpoint runs/20261126-120000
    python -m vgg_dist.evaluate --checkpoint runs/20261126-120000/checkpoints/best
    accelerate launch --multi_gpu --num_processes 2 -m vgg_dist.evaluate --checkpoint RUN_DIR

Prints one JSON object with test_acc, test_loss and test_samples. By default it reads the same data
the run trained on (its --dataset, --data-dir and --max-eval-samples); flags here override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from vgg_dist.cli import FlagParser, check_positive
from vgg_dist.data.batches import EpochBatchSampler
from vgg_dist.data.cache import DecodeOptions
from vgg_dist.data.sources import load_dataset
from vgg_dist.errors import UsageError, exit_process, exits_cleanly_on_stop
from vgg_dist.report import accuracy, sample_count
from vgg_dist.store.artifacts import load_model
from vgg_dist.training.dist import check_layout, evaluate, finish, make_accelerator, make_loader


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = FlagParser(prog="python -m vgg_dist.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run directory (its final model.safetensors), one of its checkpoints "
                             "(RUN/checkpoints/step_N), or RUN/checkpoints/best")
    parser.add_argument("--dataset", metavar="NAME", help="a built-in dataset or a Hub dataset (OWNER/NAME), as "
                                                          "train.py takes it (default: the run's own)")
    parser.add_argument("--data-dir", help="directory of images in any layout train.py takes (default: the run's "
                                           "own data source, unless --dataset names another)")
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


def decode_options(info, dataset: str, data_dir: str | None) -> DecodeOptions:
    """How images are decoded: as the run decoded its own (so its cache entry is found again), and any
    other source at the run's channels and stored size, which the model was trained on."""
    options = DecodeOptions.from_config(info.flags)
    if (dataset, data_dir) == (info.flags.dataset, info.flags.data_dir):
        return options
    return dataclasses.replace(options, channels=info.model.in_channels, data_size=info.source_image_size[0])


@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, info = load_model(args.checkpoint)
    spec, flags = info.model, info.flags
    dataset = args.dataset or flags.dataset
    data_dir = args.data_dir if args.data_dir is not None or args.dataset else flags.data_dir
    max_eval = args.max_eval_samples if args.max_eval_samples is not None else flags.max_eval_samples
    batch_size = args.batch_size or flags.batch_size
    tta = flags.tta if args.tta is None else args.tta

    accelerator = make_accelerator()
    check_layout(accelerator, batch_size)
    with accelerator.main_process_first():
        data = load_dataset(dataset, data_dir, tuple(info.class_names), decode_options(info, dataset, data_dir))
    source = f"--data-dir {data_dir}" if data_dir else f"--dataset {dataset}"
    if list(data.class_names) != list(info.class_names) and len(data.class_names) == spec.num_classes:
        raise UsageError(f"{source}: its classes ({', '.join(data.class_names[:4])}, ...) are not the model's "
                         f"({', '.join(info.class_names[:4])}, ...), so its labels would be scored against the "
                         f"wrong classes")
    if data.in_channels != spec.in_channels or len(data.class_names) != spec.num_classes:
        raise UsageError(f"{source}: its {data.in_channels}-channel images of {len(data.class_names)} classes do not "
                         f"match the model in {args.checkpoint} ({spec.in_channels} channels, {spec.num_classes} "
                         f"classes)")
    test = data.test.head(max_eval)
    if flags.channels_last:  # the layout training evaluated in
        model = model.to(memory_format=torch.channels_last)
    loader = make_loader(test, EpochBatchSampler(len(test), batch_size, shuffle=False, drop_last=False),
                         accelerator.device)
    model, loader = accelerator.prepare(model, loader)
    confusion, test_loss = evaluate(accelerator, model, loader, spec, flags.channels_last, tta)
    if accelerator.is_main_process:
        print(json.dumps({"test_acc": accuracy(confusion), "test_loss": test_loss,
                          "test_samples": sample_count(confusion), "checkpoint": str(args.checkpoint)}))
    finish(accelerator)
    return 0


if __name__ == "__main__":
    exit_process(main())
