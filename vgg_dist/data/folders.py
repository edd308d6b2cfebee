"""Which layout a --data-dir holds, and the list of images (with their labels) in each split.

Four layouts are recognised from what the folder contains: Zalando's IDX files (read by sources.py), an
ImageFolder tree (train/CLASS/*, test/CLASS/* or val/CLASS/*), a folder written by `datasets`'
`save_to_disk`, and Hub-style parquet files (data/train-*.parquet, data/test-*.parquet). Nothing is
decoded here: this module only says which bytes belong to which class, so the cache (cache.py) can
decide whether anything needs decoding at all.

Arrow and parquet files are read with pyarrow alone, their features from the schema's `huggingface`
metadata: importing `datasets` would fix its offline setting for the whole process.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from vgg_dist.errors import UsageError

IDX, IMAGE_FOLDER, SAVED, PARQUET, HUB = "idx", "imagefolder", "save_to_disk", "parquet", "hub"
# The split evaluated on when --test-split does not name one: the first of these that the source has.
TEST_NAMES = {IMAGE_FOLDER: ("test", "val"), SAVED: ("test", "validation"), PARQUET: ("test", "validation"),
              HUB: ("test", "validation")}
EXPECTED = ("Zalando's four IDX files (train-images-idx3-ubyte.gz, ...); an ImageFolder tree (train/CLASS/*, and "
            "test/CLASS/* or val/CLASS/*); a `datasets` save_to_disk folder (dataset_dict.json); or Hub-style "
            "parquet files (data/train-*.parquet, data/test-*.parquet)")


@dataclasses.dataclass
class SplitItems:
    """One split's images, not yet decoded: `names` say where each is (for messages), `blobs` hold its
    bytes when a table stores them (None: read the file `names[i]`), `labels` its class index."""

    names: list[str]
    blobs: list[bytes | None]
    labels: list[int]


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which splits and columns of a source to use (the --train-split, --test-split, --image-column and
    --label-column flags); None picks the default, or the only candidate."""

    train_split: str = "train"
    test_split: str | None = None
    image_column: str | None = None
    label_column: str | None = None


@dataclasses.dataclass
class FolderData:
    layout: str
    splits: dict[str, SplitItems]  # "train" and "test"
    class_names: tuple[str, ...]


def detect_layout(data_dir: Path, train_split: str = "train") -> str:
    """The layout `data_dir` holds, whose training split is `train_split`; a UsageError that says what was
    found when it is none of them."""
    from vgg_dist.data.sources import SPLIT_FILES
    idx_names = [name for pair in SPLIT_FILES.values() for name in pair]
    if any((data_dir / name).is_file() or (data_dir / name.removesuffix(".gz")).is_file() for name in idx_names):
        return IDX
    if (data_dir / "dataset_dict.json").is_file():
        return SAVED
    if _parquet_files(data_dir, train_split):
        return PARQUET
    train_dir = data_dir / train_split
    if train_dir.is_dir() and any(path.is_dir() for path in train_dir.iterdir()):
        return IMAGE_FOLDER
    found = sorted(path.name + ("/" if path.is_dir() else "") for path in data_dir.iterdir())
    listed = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "") if found else "nothing"
    named = "" if train_split == "train" else f" (with the training split named {train_split!r} by --train-split)"
    raise UsageError(f"--data-dir {data_dir}: found {listed}; expected one of: {EXPECTED}{named}")


def read_folder(data_dir: Path, layout: str, selection: Selection) -> FolderData:
    """The images of both splits and the class names, checked: an empty split or class is refused."""
    where = f"--data-dir {data_dir}"
    available = split_names(data_dir, layout)
    train, test = choose_splits(where, available, layout, selection)
    if layout == IMAGE_FOLDER:
        return _read_image_folder(data_dir / train, data_dir / test)
    tables = (_read_table(data_dir, layout, train), _read_table(data_dir, layout, test))
    return table_data(where, layout, tables, _features(tables[0].schema), selection)


def table_data(where: str, layout: str, tables: tuple, features: dict[str, dict], selection: Selection) -> FolderData:
    """The images and labels of a (train, test) pair of Arrow tables written by `datasets`, whose `features`
    say which columns hold images and class labels."""
    image, label = choose_columns(where, features, selection.image_column, selection.label_column)
    names = features[label].get("names") or []
    splits = {split: _table_items(f"{where}, {split} split", table, image, label)
              for split, table in zip(("train", "test"), tables)}
    for split, items in splits.items():
        if not items.labels:
            raise UsageError(f"{where}: the {split} split holds no images")
        bad = next((row for row, value in enumerate(items.labels) if not 0 <= value < len(names)), None)
        if bad is not None:
            raise UsageError(f"{items.names[bad]}: label {items.labels[bad]} is not one of the {len(names)} classes "
                             f"of column {label!r}")
    return FolderData(layout, splits, tuple(names))


def split_names(data_dir: Path, layout: str) -> list[str]:
    """The splits a folder of `layout` holds, by name."""
    if layout == IMAGE_FOLDER:
        return sorted(path.name for path in data_dir.iterdir() if path.is_dir() and not path.name.startswith("."))
    if layout == SAVED:
        return sorted(path.parent.name for path in data_dir.glob("*/state.json"))
    files = [path.name for folder in (data_dir / "data", data_dir) for path in folder.glob("*.parquet")]
    return sorted({name.split("-")[0].removesuffix(".parquet") for name in files})


def choose_splits(where: str, available: list[str], layout: str, selection: Selection) -> tuple[str, str]:
    """(training split, test split): as --train-split and --test-split say, the test split defaulting to the
    first of the layout's usual names that exists (test, then validation or val)."""
    listed = ", ".join(available) or "none"
    if selection.train_split not in available:
        raise UsageError(f"{where}: no {selection.train_split!r} split (its splits: {listed}); name the training "
                         f"split with --train-split")
    test = selection.test_split or next((name for name in TEST_NAMES[layout] if name in available), None)
    if test is None or test not in available:
        wanted = repr(test) if test else " or ".join(TEST_NAMES[layout])
        raise UsageError(f"{where}: no {wanted} split (its splits: {listed}); name the split to test on with "
                         f"--test-split")
    if test == selection.train_split:
        raise UsageError(f"--test-split {test}: is the training split too; testing on it would measure nothing")
    return selection.train_split, test


# ---- ImageFolder ----------------------------------------------------------------------------------------

def image_suffixes() -> set[str]:
    """Every file name ending that Pillow opens; anything else in a class folder (.DS_Store, notes.txt, a
    README) is not an image and is passed over."""
    from PIL import Image
    Image.init()
    return set(Image.registered_extensions())


def _read_image_folder(train_dir: Path, test_dir: Path) -> FolderData:
    suffixes = image_suffixes()
    train = _class_files(train_dir, suffixes)
    test = _class_files(test_dir, suffixes)
    class_names = tuple(sorted(train))
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise UsageError(f"--data-dir {train_dir.parent}: {test_dir.name}/ has classes that {train_dir.name}/ lacks "
                         f"({', '.join(unknown[:5])}); every test class needs training images")
    splits = {}
    for split, classes in (("train", train), ("test", test)):
        files = [(path, class_names.index(name)) for name in sorted(classes) for path in classes[name]]
        splits[split] = SplitItems([str(path) for path, _ in files], [None] * len(files), [label for _, label in files])
    return FolderData(IMAGE_FOLDER, splits, class_names)


def walk_files(root: Path, hidden: bool) -> list[Path]:
    """Every file under `root`, through symbolic links (a class folder is often a link to where the photos
    live), each real folder once, so a link back up cannot loop. os.walk tells files from folders by the
    directory entry's type: no stat per file, which on 100,000 photos is most of a listing's time."""
    found, seen = [], set()
    for where, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(where)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if hidden or not name.startswith("."))
        found += [Path(where, name) for name in names if hidden or not name.startswith(".")]
    return found


def _class_files(split_dir: Path, suffixes: set[str]) -> dict[str, list[Path]]:
    """{class name: its image files, sorted}; an empty class folder, or a split without one, is refused."""
    classes = {}
    for folder in sorted(path for path in split_dir.iterdir() if path.is_dir() and not path.name.startswith(".")):
        files = sorted(path for path in walk_files(folder, hidden=False)
                       if os.path.splitext(path.name)[1].lower() in suffixes)
        if not files:
            raise UsageError(f"{folder}: class folder holds no images; add some or remove the folder")
        classes[folder.name] = files
    if not classes:
        raise UsageError(f"{split_dir}: holds no class folders, so the split has no images")
    return classes


# ---- save_to_disk and parquet ----------------------------------------------------------------------------

def _parquet_files(data_dir: Path, split: str) -> list[Path]:
    found = []
    for folder in (data_dir / "data", data_dir):
        found += sorted(folder.glob(f"{split}-*.parquet")) + sorted(folder.glob(f"{split}.parquet"))
    return found


def _read_table(data_dir: Path, layout: str, split: str):
    """The split as one pyarrow Table (memory-mapped where it can be), or None when there is no such split."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        if layout == PARQUET:
            files = _parquet_files(data_dir, split)
            return pa.concat_tables([pq.read_table(path) for path in files]) if files else None
        split_dir = data_dir / split
        if not (split_dir / "state.json").is_file():
            return None
        state = json.loads((split_dir / "state.json").read_text())
        shards = [split_dir / entry["filename"] for entry in state["_data_files"]]
        return pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(path))).read_all() for path in shards])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as error:
        raise UsageError(f"--data-dir {data_dir}: its {split} split cannot be read ({str(error).splitlines()[0]})") \
            from None


def _features(schema) -> dict[str, dict]:
    """The `datasets` features a table was written with, from its schema metadata."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        features = {}
    return {name: value for name, value in features.items() if isinstance(value, dict)}


def choose_columns(where: str, features: dict[str, dict], image_column: str | None,
                   label_column: str | None) -> tuple[str, str]:
    """(image column, label column) from the features: given by flag, or the only candidate of its kind."""
    chosen = []
    wanted = (("Image", image_column, "--image-column"), ("ClassLabel", label_column, "--label-column"))
    for kind, given, flag in wanted:
        candidates = [name for name, feature in features.items() if feature.get("_type") == kind]
        if given is not None and given not in candidates:
            raise UsageError(f"{flag} {given}: not a{'n' if kind == 'Image' else ''} {kind} column of {where}; "
                             f"its {kind} columns: {', '.join(candidates) or 'none'}")
        if given is None and len(candidates) != 1:
            if not candidates:
                raise UsageError(f"{where}: its features declare no {kind} column (vgg_dist reads images from an "
                                 f"Image column and classes from a ClassLabel column, as `datasets` writes them)")
            raise UsageError(f"{where}: several {kind} columns ({', '.join(candidates)}); name the one to use with "
                             f"{flag}")
        chosen.append(given or candidates[0])
    return chosen[0], chosen[1]


def _table_items(where: str, table, image: str, label: str) -> SplitItems:
    """Each row's image bytes (or the file it names) and label; rows are named `<where> row N` in messages."""
    cells = table.column(image).to_pylist()
    labels = table.column(label).to_pylist()
    names, blobs = [], []
    for row, cell in enumerate(cells):
        cell = cell or {}
        names.append(cell.get("path") if not cell.get("bytes") and cell.get("path") else f"{where} row {row}")
        blobs.append(cell.get("bytes") or None)
    return SplitItems(names, blobs, [int(value) if value is not None else -1 for value in labels])
