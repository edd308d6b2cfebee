"""Write a folder of Zalando's four IDX files (Fashion-MNIST, MNIST) as an ImageFolder tree of PNG files,
OUT/train/CLASS/N.png and OUT/test/CLASS/N.png: the same images in the layout a user's own photos come in,
for timing the folder path against torchvision's ImageFolder on real data.

    python tools/idx_to_image_folder.py data/fashion_mnist data/fashion_mnist_png
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vgg_dist.data.sources import DATASETS, load_from_dir  # noqa: E402  (the repository, put on the path above)


def main(source: str, output: str) -> None:
    names = DATASETS["fashion_mnist"].class_names
    data = load_from_dir(Path(source), names)
    for split_name, split in (("train", data.train), ("test", data.test)):
        folders = [Path(output, split_name, name.replace("/", "-")) for name in names]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(split.images[:, 0].numpy(), split.labels.tolist())):
            Image.fromarray(image, mode="L").save(folders[label] / f"{index}.png")
        print(f"{split_name}: {len(split):,} images")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    main(sys.argv[1], sys.argv[2])
