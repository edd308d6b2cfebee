"""Classify image files with a trained run, from its config.json + model.safetensors alone.

    python -m vgg_dist.predict --checkpoint runs/20261126-120000 shoe.png shirt.jpg
    python -m vgg_dist.predict --checkpoint RUN_DIR --top-k 3 --json photo.jpg

Each image (PNG, JPEG, anything Pillow reads, any size, colour or grayscale, 8 or 16 bits) is turned
into what the model saw in training: converted to the run's channels and stored size as training images
were (vgg_dist/data/images.py), then resized and scaled on the way into the model exactly as training
batches are. Fashion-MNIST shows light garments on black: a dark-on-white photo is inverted first,
and says so (--invert / --no-invert decide instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vgg_dist.cli import FlagParser, check_positive
from vgg_dist.data.batches import to_model_input
from vgg_dist.data.images import decode
from vgg_dist.data.sources import border_mean
from vgg_dist.errors import exit_process, exits_cleanly_on_stop
from vgg_dist.model import ModelSpec, log_probabilities
from vgg_dist.store.artifacts import load_model
from vgg_dist.store.run_files import RunInfo

# Border grey levels (0-255) this far apart mean opposite backgrounds: dark on light against light on dark.
INVERT_GAP = 128


def load_image(path: Path, info: RunInfo, invert: bool | None) -> tuple[torch.Tensor, bool]:
    """(one file as uint8 [C, h, w] as the run stored its images, whether it was inverted). With `invert`
    None, an image whose background is the opposite of the training images' (a dark-on-white product photo
    for Fashion-MNIST's light-on-black) is inverted."""
    image = decode(path, info.model.in_channels, tuple(info.source_image_size))
    if invert is None:
        invert = info.background is not None and abs(border_mean(image[None]) - info.background) > INVERT_GAP
    return (255 - image if invert else image), invert


def predict(model: torch.nn.Module, images: torch.Tensor, spec: ModelSpec, tta: bool = False) -> torch.Tensor:
    """Class probabilities [N, classes] for uint8 images [N, C, h, w], resized and standardised as `spec`
    says; with `tta`, the mean of the probabilities for each image and its mirror, as evaluation computes them."""
    with torch.no_grad():
        x = to_model_input(images, spec.image_size, mean=spec.input_mean, std=spec.input_std)
        return log_probabilities(model, x, tta).exp()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = FlagParser(prog="python -m vgg_dist.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run directory (its final model.safetensors), one of its checkpoints "
                             "(RUN/checkpoints/step_N), or RUN/checkpoints/best")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to show per image")
    parser.add_argument("--invert", action=argparse.BooleanOptionalAction, default=None,
                        help="invert the image's levels (default: when its background is the opposite of the "
                             "training images', as a dark-on-white photo is for Fashion-MNIST)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average the predictions on each image and its mirror (default: as the run evaluated)")
    args = parser.parse_args(argv)
    check_positive("top_k", args.top_k)
    return args


@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, info = load_model(Path(args.checkpoint))
    loaded = [load_image(Path(path), info, args.invert) for path in args.images]
    for path, (_, inverted) in zip(args.images, loaded):
        if inverted and args.invert is None:
            print(f"note: {path} has a background unlike the training images'; inverted it (--no-invert keeps "
                  f"it as it is)", file=sys.stderr)
    tta = info.flags.tta if args.tta is None else args.tta
    probabilities = predict(model, torch.stack([image for image, _ in loaded]), info.model, tta)
    top = probabilities.topk(min(args.top_k, probabilities.shape[1]), dim=1)
    for path, values, indices in zip(args.images, top.values.tolist(), top.indices.tolist()):
        ranked = [{"class": info.class_names[index], "index": index, "probability": value}
                  for value, index in zip(values, indices)]
        if args.json:
            print(json.dumps({"image": path, "top": ranked}))
        else:
            print(f"{path}: " + ", ".join(f"{entry['class']} {entry['probability']:.3f}" for entry in ranked))
    return 0


if __name__ == "__main__":
    exit_process(main())
