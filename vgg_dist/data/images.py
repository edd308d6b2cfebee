"""One image file as the uint8 tensor a run stores: opened safely, brought to the run's channels at
8 bits, and fitted to its stored size.

What reaches the model must look like the training images, whatever the file: a 16-bit PNG is scaled
to 8 bits (Pillow's own conversion clips it), a photo keeps its proportions (the shorter side is
fitted, then the centre is cropped), and a file too large to decode safely is refused before its
pixels are read.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from vgg_dist.errors import UsageError

# Pillow modes that hold more than 8 bits per grey level, and the largest value each can hold.
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


class ImageError(UsageError):
    """An image file that cannot be used; the message names the file."""


# Modes whose pixels are grey levels only: a dataset of nothing else trains a 1-channel model.
GREY_MODES = {"1", "L", "LA", "F", *WIDE_MODES}
# EXIF orientations that turn the picture a quarter: its height and width swap once applied.
QUARTER_TURNS = {5, 6, 7, 8}


@contextlib.contextmanager
def _reading(name: str):
    """Turns whatever Pillow raises for the file called `name` into one ImageError line."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice that; a warning is not an answer.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: over {Image.MAX_IMAGE_PIXELS:,} pixels, too many to decode safely; "
                         f"shrink it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageError(f"{name}: not a readable image ({reason})") from None


def _source(path: Path, data: bytes | None):
    """What Pillow opens: the bytes when a dataset holds them (a parquet row), else the file."""
    if data is not None:
        return io.BytesIO(data)
    if path.exists() and not path.is_file():  # a FIFO or device would block or never end
        raise ImageError(f"{path}: not a regular file")
    return path


def open_image(path: Path, data: bytes | None = None):
    """The decoded image with its EXIF orientation applied; refuses anything that is not a regular,
    readable image file of a safe size, in one line. With `data`, the image is those bytes and `path`
    only names them."""
    from PIL import Image, ImageOps
    source = _source(path, data)
    with _reading(str(path)):
        with Image.open(source) as image:
            image.load()
            return ImageOps.exif_transpose(image)


def probe_image(path: Path, data: bytes | None = None) -> tuple[bool, int, int]:
    """(whether it is grey, height, width as displayed) from the header alone: Pillow reads no pixels
    until asked, so a dataset's channels and size are known before anything is decoded."""
    from PIL import Image
    source = _source(path, data)
    with _reading(str(path)):
        with Image.open(source) as image:
            grey = image.mode in GREY_MODES or (image.mode in ("P", "PA") and _grey_palette(image))
            width, height = image.size
            if image.getexif().get(0x0112, 1) in QUARTER_TURNS:
                width, height = height, width
            return grey, height, width


def _grey_palette(image) -> bool:
    palette = image.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


def to_channels(image, channels: int) -> torch.Tensor:
    """uint8 [C, h, w] with `channels` 1 (grey) or 3 (RGB). Wide grey levels are scaled to 8 bits."""
    if image.mode in WIDE_MODES:
        wide = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(wide * (255.0 / WIDE_MODES[image.mode])), 0, 255).astype(np.uint8)
        array = grey if channels == 1 else np.repeat(grey[..., None], 3, axis=2)
    else:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def fit_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [C, h, w] cut to the proportions of `size` (height, width) around its centre, then resized to
    `size`: what torchvision's Resize + CenterCrop give. The crop comes first, in the image's own pixels,
    because scaling a 1 x 5,000,000 sliver up to cover the target before cropping would allocate
    gigabytes for pixels the crop then throws away."""
    height, width = image.shape[1:]
    kept = (min(height, max(1, round(width * size[0] / size[1]))), min(width, max(1, round(height * size[1] / size[0]))))
    top, left = (height - kept[0]) // 2, (width - kept[1]) // 2
    cropped = image[None, :, top:top + kept[0], left:left + kept[1]].float()
    resized = torch.nn.functional.interpolate(cropped, size=size, mode="bilinear", align_corners=False,
                                              antialias=size[0] < kept[0])[0]
    return resized.round().clamp(0, 255).to(torch.uint8)


def decode(path: Path, channels: int, size: tuple[int, int], data: bytes | None = None) -> torch.Tensor:
    """The file at `path` (or the image in `data`) as uint8 [channels, *size], ready to stack with a run's
    stored images."""
    return fit_to(to_channels(open_image(path, data), channels), size)
