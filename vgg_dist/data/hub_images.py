"""Any image-classification dataset on the Hugging Face Hub (`--dataset OWNER/NAME`, and the built-in
cifar10 and cifar100), downloaded by `datasets` and decoded once into the cache, as a folder is.

`datasets` keeps a download as Arrow files whose Image column holds each image's encoded bytes: those
bytes are what the cache decodes, exactly as it decodes a parquet folder's. The cache entry is keyed by
the splits' own fingerprints, which `datasets` derives from the files it downloaded, so a new revision of
the dataset is a new entry, and a second run decodes nothing.
"""

from __future__ import annotations

import json

from vgg_dist.data.cache import DecodeOptions, ImageSource, load_cached
from vgg_dist.data.folders import HUB, choose_splits, table_data
from vgg_dist.data.sources import ImageData, hub_dataset


def hub_no_data(dataset: str, hub_id: str, reason: str) -> str:
    return (f"--dataset {dataset}: no data: {reason}. Run once with a network to fill `datasets`' cache, or "
            f"download its parquet files (https://huggingface.co/datasets/{hub_id}) into a folder and pass "
            f"--data-dir FOLDER")


def load_hub_images(dataset: str, hub_id: str, options: DecodeOptions) -> ImageData:
    """The dataset's training and test splits (as --train-split and --test-split choose) from the cache,
    decoded from `datasets`' download the first time."""
    loaded = hub_dataset(hub_id, lambda reason: hub_no_data(dataset, hub_id, reason))
    where = f"--dataset {dataset}"
    train, test = choose_splits(where, sorted(loaded), HUB, options.selection)
    # Features as `datasets` writes them into files: {"img": {"_type": "Image"}, "label": {"_type": ...}}
    features = loaded[train].features.to_dict()
    tables = tuple(loaded[split].data.table for split in (train, test))  # fresh from load_dataset: no index map
    # `_fingerprint` is the hash `datasets` itself keys its caches with; it has no public name.
    content = json.dumps({"hub_id": hub_id, "train": loaded[train]._fingerprint, "test": loaded[test]._fingerprint})
    source = ImageSource(name=f"hf://{hub_id}", label=hub_id.replace("/", "--"), layout=HUB, content=content,
                         read=lambda: table_data(where, HUB, tables, features, options.selection))
    return load_cached(source, options)
