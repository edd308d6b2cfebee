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
            if _orientation(image) == 1:  # exif_transpose would copy the pixels even when it turns nothing
                return image
            return ImageOps.exif_transpose(image)


def _orientation(image) -> int:
    """The EXIF orientation (1: as stored). A PNG keeps EXIF in an eXIf chunk, which Pillow has already read
    when it comes before the pixels; asking Pillow for one that is not there would decode the whole image."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(0x0112, 1)


def probe_image(path: Path, data: bytes | None = None) -> tuple[bool, int, int]:
    """(whether it is grey, height, width as displayed) from the header alone: Pillow reads no pixels
    until asked, so a dataset's channels and size are known before anything is decoded."""
    from PIL import Image
    source = _source(path, data)
    with _reading(str(path)):
        with Image.open(source) as image:
            grey = image.mode in GREY_MODES or (image.mode in ("P", "PA") and _grey_palette(image))
            width, height = image.size
            if _orientation(image) in QUARTER_TURNS:
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


def centre_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, kept height, kept width): the largest region around the centre with the proportions of
    `size` (height, width). Cropped before resizing, in the image's own pixels, because scaling a
    1 x 5,000,000 sliver up to cover the target first would allocate gigabytes the crop then throws away."""
    kept = (min(height, max(1, round(width * size[0] / size[1]))), min(width, max(1, round(height * size[1] / size[0]))))
    return (height - kept[0]) // 2, (width - kept[1]) // 2, kept[0], kept[1]


def fit_image(image, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A PIL image as uint8 [channels, *size]: converted as Pillow converts, its centre region cut to the
    proportions of `size` and resized with Pillow's bilinear filter (antialiased when shrinking), in one
    pass: what torchvision's Resize + CenterCrop give, for a fraction of the per-image cost of a torch
    resize. Wide grey levels take `to_channels` and `fit_to`, since Pillow's conversion would clip them."""
    from PIL import Image
    if image.mode == "F":  # 32-bit floats: 0-1 or 0-255 cannot be told apart, and Pillow's convert clips them
        raise ImageError("32-bit floating-point pixels; save the image as 8- or 16-bit")
    if image.mode in WIDE_MODES:
        return fit_to(to_channels(image, channels), size)
    mode = "L" if channels == 1 else "RGB"
    image = image if image.mode == mode else image.convert(mode)
    top, left, kept_height, kept_width = centre_box(image.height, image.width, size)
    if (kept_height, kept_width) != size or (top, left) != (0, 0):
        box = (left, top, left + kept_width, top + kept_height)
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box)
    tensor = torch.from_numpy(np.array(image, dtype=np.uint8))
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def fit_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [C, h, w] (a tensor) cut to the proportions of `size` (height, width) around its centre, then
    resized to `size` with torch's bilinear filter, antialiased when shrinking as Pillow's is."""
    top, left, *kept = centre_box(*image.shape[1:], size)
    cropped = image[None, :, top:top + kept[0], left:left + kept[1]].float()
    resized = torch.nn.functional.interpolate(cropped, size=size, mode="bilinear", align_corners=False,
                                              antialias=size[0] < kept[0])[0]
    return resized.round().clamp(0, 255).to(torch.uint8)


def decode(path: Path, channels: int, size: tuple[int, int], data: bytes | None = None) -> torch.Tensor:
    """The file at `path` (or the image in `data`) as uint8 [channels, *size], ready to stack with a run's
    stored images."""
    image = open_image(path, data)
    try:
        return fit_image(image, channels, size)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None
