import gzip
import json
import os
import struct
import re
import subprocess
import sys
import time

import pytest
import torch

from vgg_dist.data.batches import EpochBatchSampler, to_model_input
from vgg_dist.data.sources import SPLIT_FILES, load_dataset, read_idx, write_idx
from vgg_dist.errors import UsageError
from vgg_dist.data.synthetic import make_images, write_dataset


def test_idx_round_trip(tmp_path):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / "x.gz", images)
    assert torch.equal(read_idx(tmp_path / "x.gz", expected_dims=3), images)


def test_dataset_round_trip_keeps_uint8_28x28(tmp_path):
    write_dataset(tmp_path, train=12, test=5)
    data = load_dataset("fashion_mnist", tmp_path)
    assert data.train.images.shape == (12, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.test.labels.shape == (5,) and data.test.labels.dtype == torch.int64
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"


def test_plain_decompressed_files_are_accepted(tmp_path):
    write_dataset(tmp_path, train=12, test=5)
    for path in tmp_path.glob("*.gz"):
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    assert len(load_dataset("fashion_mnist", tmp_path).train) == 12


def _corrupt(tmp_path, name, payload: bytes, compress=True):
    write_dataset(tmp_path, train=12, test=5)
    (tmp_path / name).write_bytes(gzip.compress(payload) if compress else payload)


def _idx(magic_dims: int, shape, body: bytes) -> bytes:
    return struct.pack(">HBB", 0, 8, magic_dims) + struct.pack(f">{len(shape)}I", *shape) + body


CORRUPTIONS = {
    "truncated gzip": ("train-images-idx3-ubyte.gz", None, "not a readable gzip file"),
    "not gzip": ("train-images-idx3-ubyte.gz", (b"hello, this is not gzip", False), "not a readable gzip file"),
    "wrong magic": ("train-images-idx3-ubyte.gz", (_idx(1, [12], bytes(12)), True), "wrong magic number"),
    "too short": ("train-labels-idx1-ubyte.gz", (b"\x00\x00", True), "too short"),
    "body shorter than header says": ("train-images-idx3-ubyte.gz", (_idx(3, [12, 28, 28], bytes(100)), True),
                                      "header promises shape"),
    "count mismatch": ("train-labels-idx1-ubyte.gz", (_idx(1, [11], bytes(11)), True), "holds 11 labels"),
    "label out of range": ("t10k-labels-idx1-ubyte.gz", (_idx(1, [5], bytes([0, 1, 2, 10, 3])), True),
                           "label 10 is not below the 10 classes"),
    "no images": ("train-images-idx3-ubyte.gz", (_idx(3, [0, 28, 28], b""), True), "holds 12 labels but"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_each_corruption_names_the_file(tmp_path, case):
    name, payload, message = CORRUPTIONS[case]
    if payload is None:  # cut a valid gzip file in half
        write_dataset(tmp_path, train=12, test=5)
        whole = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(whole[: len(whole) // 2])
    else:
        _corrupt(tmp_path, name, *payload)
    with pytest.raises(UsageError, match=message) as caught:
        load_dataset("fashion_mnist", tmp_path)
    assert name in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_with_no_images_is_refused(tmp_path, split):
    write_dataset(tmp_path, train=12, test=5)
    images_name, labels_name = SPLIT_FILES[split]
    (tmp_path / images_name).write_bytes(gzip.compress(_idx(3, [0, 28, 28], b"")))
    (tmp_path / labels_name).write_bytes(gzip.compress(_idx(1, [0], b"")))
    with pytest.raises(UsageError, match=f"{images_name}: holds no images"):
        load_dataset("fashion_mnist", tmp_path)


def test_missing_file_names_the_flag_and_the_file(tmp_path):
    write_dataset(tmp_path, train=12, test=5)
    (tmp_path / SPLIT_FILES["test"][0]).unlink()
    with pytest.raises(UsageError, match="--data-dir .* missing t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion_mnist", tmp_path)


def test_validation_survives_python_O(tmp_path):
    write_dataset(tmp_path, train=12, test=5)
    _corrupt(tmp_path, "train-labels-idx1-ubyte.gz", _idx(1, [11], bytes(11)))
    code = f"from vgg_dist.data.sources import load_dataset; load_dataset('fashion_mnist', {str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "holds 11 labels" in result.stderr


def test_offline_hub_says_how_to_get_the_data(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-vgg-dist-cache")
    with pytest.raises(UsageError) as caught:
        load_dataset("fashion_mnist", None)
    message = str(caught.value)
    assert "--data-dir" in message and "train-images-idx3-ubyte.gz" in message and "\n" not in message
    assert message.startswith("no fashion_mnist data: the Hub is not reachable (HF_HUB_OFFLINE=1) and "
                              "zalando-datasets/fashion_mnist is not in the local cache")


@pytest.mark.slow
def test_an_unreachable_hub_fails_in_seconds_not_after_retries(tmp_path):
    # A port nothing listens on: `datasets` alone would retry for half a minute.
    code = "from vgg_dist.data.sources import load_dataset; load_dataset('fashion_mnist', None)"
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert time.monotonic() - started < 15
    assert "HF_HUB_OFFLINE=1" in result.stderr and "pass --data-dir DIR" in result.stderr


def test_sampler_order_depends_only_on_seed_and_epoch():
    a = EpochBatchSampler(100, 8, shuffle=True, drop_last=True, seed=3)
    b = EpochBatchSampler(100, 8, shuffle=True, drop_last=True, seed=3)
    a.start_epoch(2), b.start_epoch(2)
    assert list(a) == list(b) and len(list(a)) == len(a) == 12
    b.start_epoch(3)
    assert list(a) != list(b)
    everything = sorted(i for batch in EpochBatchSampler(100, 8, False, False) for i in batch)
    assert everything == list(range(100))


def test_sampler_skip_continues_the_same_permutation():
    whole = EpochBatchSampler(100, 8, shuffle=True, drop_last=True, seed=3)
    whole.start_epoch(1)
    rest = EpochBatchSampler(100, 8, shuffle=True, drop_last=True, seed=3)
    rest.start_epoch(1, skip_batches=5)
    assert list(rest) == list(whole)[5:] and len(rest) == 7


def test_model_input_is_resized_and_scaled():
    images = torch.tensor([[[[0, 255], [255, 0]]]], dtype=torch.uint8)
    x = to_model_input(images, 32)
    assert x.shape == (1, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert x[0, 0, 0, 0] == 0 and x[0, 0, 0, -1] == 1  # corners keep their pixel


def test_one_channel_input_gets_nhwc_strides_over_the_same_values():
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    plain, nhwc = to_model_input(images, 64), to_model_input(images, 64, channels_last=True)
    assert torch.equal(plain, nhwc) and nhwc.stride() == (64 * 64, 1, 64, 1)
    color = to_model_input(images.expand(3, 3, 28, 28), 64, channels_last=True)
    assert color.stride() == (64 * 64 * 3, 1, 64 * 3, 3)


def test_device_resize_is_close_to_the_chapters_pil_resize():
    from PIL import Image
    from torchvision import transforms
    images, _ = make_images(16, seed=4)
    pil = transforms.Compose([transforms.Resize(224), transforms.ToTensor()])
    reference = torch.stack([pil(Image.fromarray(image.numpy())) for image in images])
    ours = to_model_input(images.unsqueeze(1), 224)
    difference = (ours - reference).abs()
    # The same bilinear filter both ways: PIL only rounds its result to 8 bits, so they differ by at
    # most one grey level.
    assert difference.max() <= 1 / 255 + 1e-6
    assert difference.mean() < 0.5 / 255


HUB_COPY_SCRIPT = """
import dataclasses, json, sys
import datasets, torch
from PIL import Image
from vgg_dist.data import sources as data
from vgg_dist.data.synthetic import make_images
folder = sys.argv[1]
images, labels = make_images(12, seed=5)
names = list(data.DATASETS["fashion_mnist"].class_names)
features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
split = datasets.Dataset.from_dict({"image": [Image.fromarray(image.numpy()) for image in images],
                                    "label": labels.tolist()}, features=features)
split.to_parquet(f"{folder}/fashion_mnist/train-00000-of-00001.parquet")
split.select(range(5)).to_parquet(f"{folder}/fashion_mnist/test-00000-of-00001.parquet")
data.DATASETS["fashion_mnist"] = dataclasses.replace(data.DATASETS["fashion_mnist"], hub_id=folder)
loaded = data.load_dataset("fashion_mnist", None)
print(json.dumps({"shape": list(loaded.train.images.shape), "dtype": str(loaded.train.images.dtype),
                  "images_equal": torch.equal(loaded.train.images[:, 0], images),
                  "labels_equal": torch.equal(loaded.train.labels, labels.long()),
                  "test_labels_equal": torch.equal(loaded.test.labels, labels[:5].long()), "source": loaded.source}))
"""


@pytest.mark.slow
def test_hub_path_loads_a_dataset_laid_out_as_the_hub_copy(tmp_path):
    """The real `datasets.load_dataset` on a local folder shaped like zalando-datasets/fashion_mnist
    (parquet shards of an image column and a class-label column): the column handling, proven offline.
    In its own process, so that this one never imports `datasets` (it reads its offline setting once)."""
    (tmp_path / "fashion_mnist").mkdir()
    env = {**os.environ, "HF_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", HUB_COPY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {"shape": [12, 1, 28, 28], "dtype": "torch.uint8", "images_equal": True, "labels_equal": True,
                      "test_labels_equal": True, "source": f"hf://{tmp_path}"}


# ---- single image files, as predict reads them ---------------------------------------------------------

def test_a_16_bit_image_is_scaled_to_8_bits_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from vgg_dist.data.images import decode
    gradient = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(1, 256)
    path = tmp_path / "wide.png"
    Image.fromarray(gradient).save(path)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")  # Pillow's own convert("L") clips these to 0 or 255
    decoded = decode(path, 1, (1, 256))[0, 0]
    expected = torch.from_numpy((gradient[0] / 257).round().astype(np.uint8))
    assert torch.equal(decoded, expected) and decoded[128] in (127, 128)
    assert decode(path, 3, (1, 256)).shape == (3, 1, 256)


def test_a_photo_keeps_its_proportions(tmp_path):
    from PIL import Image

    from vgg_dist.data.images import decode
    wide = torch.zeros(20, 40, dtype=torch.uint8)
    wide[:, 10:30] = 255  # a white square between black margins
    path = tmp_path / "wide.png"
    Image.fromarray(wide.numpy()).save(path)
    decoded = decode(path, 1, (10, 10))[0]
    # The shorter side fills 10 pixels and the centre is kept: the square and nothing else (its edge columns
    # only softened by the antialiasing filter). Squeezed to 10 x 10 instead, black margins would show.
    assert decoded.shape == (10, 10) and (decoded[:, 1:-1] == 255).all() and (decoded > 200).all()


def test_an_image_just_over_the_pixel_limit_is_refused_without_a_warning(tmp_path, recwarn):
    import struct
    import zlib

    from PIL import Image

    from vgg_dist.data.images import ImageError, decode

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    side = int((1.5 * Image.MAX_IMAGE_PIXELS) ** 0.5)  # between the limit and twice it: Pillow only warns
    path = tmp_path / "large.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="too many to decode safely; shrink it first") as caught:
        decode(path, 1, (28, 28))
    assert str(path) in str(caught.value) and not recwarn.list


# ---- class names -----------------------------------------------------------------------------------------

def test_class_names_come_from_a_file_when_given(tmp_path):
    from vgg_dist.data.sources import read_class_names
    write_dataset(tmp_path, train=12, test=5)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"digit {n}" for n in range(10)) + "\n\n")
    data = load_dataset("fashion_mnist", tmp_path, read_class_names(names))
    assert data.class_names == tuple(f"digit {n}" for n in range(10))
    assert load_dataset("mnist", tmp_path).class_names == tuple(str(n) for n in range(10))


@pytest.mark.parametrize("text, message", [
    ("a\nb\na\n", "names repeat (a)"),
    ("only\n", "needs at least two names"),
    ("a\n\nb\n", "no blank lines between them"),
])
def test_a_bad_class_names_file_is_refused(tmp_path, text, message):
    from vgg_dist.data.sources import read_class_names
    path = tmp_path / "names.txt"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(f"--class-names {path}: ")) as caught:
        read_class_names(path)
    assert message in str(caught.value)


def test_fewer_class_names_than_labels_is_refused(tmp_path):
    write_dataset(tmp_path, train=40, test=5)
    with pytest.raises(UsageError, match="is not below the 3 classes"):
        load_dataset("fashion_mnist", tmp_path, ("a", "b", "c"))


def test_a_run_records_its_class_names_and_where_they_came_from(tmp_path, tiny_data):
    from conftest import TINY_MODEL, train_here
    quick = [*TINY_MODEL, "--epochs", "1", "--batch-size", "32", "--max-train-samples", "64",
             "--max-eval-samples", "32"]
    names = tmp_path / "digits.txt"
    names.write_text("\n".join(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]))
    runs = {"file": ["--class-names", str(names)], "mnist": ["--dataset", "mnist"], "default": []}
    recorded = {}
    for name, flags in runs.items():
        run_dir, _, _ = train_here(tmp_path, tiny_data, *quick, *flags, name=name)
        config = json.loads((run_dir / "config.json").read_text())
        recorded[name] = (config["class_names"][:2], config["class_names_from"])
    assert recorded == {"file": (["zero", "one"], str(names)), "mnist": (["0", "1"], "mnist"),
                        "default": (["T-shirt/top", "Trouser"], "fashion_mnist")}


def test_a_thin_sliver_is_cropped_before_it_is_resized():
    from vgg_dist.data.images import fit_to
    sliver = torch.arange(5_000_000, dtype=torch.int64).remainder(256).to(torch.uint8).view(1, 1, 5_000_000)
    fitted = fit_to(sliver, (28, 28))  # resized first, this would allocate about 15 GB
    assert fitted.shape == (1, 28, 28)


def test_standardised_input_is_the_scaled_input_less_the_mean_over_the_std_per_channel():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.25, 0.5]
    plain, standardised = to_model_input(images, 32), to_model_input(images, 32, mean=mean, std=std)
    for channel in range(3):
        expected = (plain[:, channel] - mean[channel]) / std[channel]
        assert torch.allclose(standardised[:, channel], expected, atol=1e-6)
    assert torch.equal(to_model_input(images, 32, mean=None, std=None), plain)  # the chapter's arithmetic, untouched
