"""Classify image files with a trained run, from its config.json + model.safetensors alone.

    python -m vgg_dist.predict --checkpoint runs/20261126-120000 shoe.png shirt.jpg
    python -m vgg_dist.predict --checkpoint RUN_DIR --top-k 3 --json photo.jpg

Each image (PNG, JPEG, anything Pillow reads, any size, colour or grayscale) is turned into what the
model saw in training: converted to grayscale, resized to the dataset's 28x28, then resized and scaled
on the way into the model exactly as training batches are. Fashion-MNIST shows light garments on a
black background; pass --invert for the usual dark-on-white product photo.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vgg_dist import artifacts
from vgg_dist.cli import FlagParser, check_positive
from vgg_dist.data import to_model_input
from vgg_dist.errors import UsageError, exit_process, exits_cleanly_on_stop
from vgg_dist.model import log_probabilities


def load_image(path: Path, in_channels: int, source_size: tuple[int, int], invert: bool) -> torch.Tensor:
    """One file as uint8 [C, h, w] at the dataset's own resolution."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    if path.exists() and not path.is_file():  # a FIFO or device would block or never end
        raise UsageError(f"{path}: not a regular file")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("L" if in_channels == 1 else "RGB")
            image = image.resize((source_size[1], source_size[0]), Image.Resampling.BILINEAR, reducing_gap=None)
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except Image.DecompressionBombError:
        raise UsageError(f"{path}: too many pixels to decode safely (over {2 * Image.MAX_IMAGE_PIXELS:,}); "
                         f"shrink it first") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UsageError(f"{path}: not a readable image ({str(error).splitlines()[0]})") from None
    if invert:
        image = ImageOps.invert(image)
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def predict(model: torch.nn.Module, images: torch.Tensor, image_size: int, tta: bool = False) -> torch.Tensor:
    """Class probabilities [N, classes] for uint8 images [N, C, h, w]; with `tta`, the mean of the
    probabilities for each image and its mirror, as evaluation computes them."""
    with torch.no_grad():
        return log_probabilities(model, to_model_input(images, image_size), tta).exp()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = FlagParser(prog="python -m vgg_dist.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run directory (its final model.safetensors), one of its checkpoints "
                             "(RUN/checkpoints/step_N), or RUN/checkpoints/best")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to show per image")
    parser.add_argument("--invert", action="store_true", help="invert grey levels (dark object on light background)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average the predictions on each image and its mirror (default: as the run evaluated)")
    args = parser.parse_args(argv)
    check_positive("top_k", args.top_k)
    return args


@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, run_config = artifacts.load_model(Path(args.checkpoint))
    spec = run_config["model"]
    class_names = run_config.get("class_names") or [str(index) for index in range(spec["num_classes"])]
    source_size = tuple(run_config.get("source_image_size", (28, 28)))
    images = torch.stack([load_image(Path(path), spec["in_channels"], source_size, args.invert)
                          for path in args.images])
    tta = run_config.get("flags", {}).get("tta") is True if args.tta is None else args.tta
    probabilities = predict(model, images, spec["image_size"], tta)
    top = probabilities.topk(min(args.top_k, probabilities.shape[1]), dim=1)
    for path, values, indices in zip(args.images, top.values.tolist(), top.indices.tolist()):
        ranked = [{"class": class_names[index], "index": index, "probability": value}
                  for value, index in zip(values, indices)]
        if args.json:
            print(json.dumps({"image": path, "top": ranked}))
        else:
            shown = ", ".join(f"{entry['class']} {entry['probability']:.3f}" for entry in ranked)
            print(f"{path}: {shown}")
    return 0


if __name__ == "__main__":
    exit_process(main())
