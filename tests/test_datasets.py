"""A --data-dir of the user's own images: an ImageFolder tree, a `datasets` save_to_disk folder or Hub-style
parquet files, decoded once into a cache that later runs read without decoding anything.

Every test writes its own tiny images with Pillow and keeps its cache under tmp_path. `datasets` itself is
only imported in a subprocess that writes the data: importing it here would fix its offline setting for
every later test in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_MODEL, quiet_env, run_main, train_here
from vgg_dist import predict
from vgg_dist.data import decode as decode_module
from vgg_dist.data.cache import DecodeOptions
from vgg_dist.data.sources import load_dataset
from vgg_dist.errors import UsageError

QUICK = [*TINY_MODEL, "--epochs", "1", "--batch-size", "4", "--decode-workers", "1"]


def _picture(colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> np.ndarray:
    """An RGB picture [height, width, 3] of one colour with noise, so classes differ and images do too."""
    noise = np.random.default_rng(seed).integers(0, 40, (*size, 3))
    return np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)


def write_mixed(path: Path, index: int, colour) -> None:
    """One of four kinds of file, by `index`: PNG, JPEG, GIF (palette) and RGBA PNG, each its own size."""
    kind = index % 4
    size = [(24, 40), (32, 32), (20, 20), (50, 36)][kind]
    image = Image.fromarray(_picture(colour, size, index))
    if kind == 0:
        image.save(path.with_suffix(".png"))
    elif kind == 1:
        image.save(path.with_suffix(".jpg"), quality=90)
    elif kind == 2:
        image.convert("P").save(path.with_suffix(".gif"))
    else:
        image.convert("RGBA").save(path.with_suffix(".png"))


def image_folder(root: Path, per_class: int = 6, test_name: str = "test") -> Path:
    """train/ and test/ (or val/) of classes cat and dog in mixed formats and sizes, with files that are
    not images beside them."""
    for split, count in (("train", per_class), (test_name, 2)):
        for label, (name, colour) in enumerate((("cat", (200, 40, 40)), ("dog", (40, 40, 200)))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                write_mixed(folder / f"{split}{index}", index + label, colour)
            (folder / ".DS_Store").write_bytes(b"\0\1junk")
            (folder / "notes.txt").write_text("not an image")
    (root / "README").write_text("my photos")
    return root


def grey_folder(root: Path, side: int = 16) -> Path:
    for split, count in (("train", 4), ("test", 2)):
        for label, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                grey = _picture((60 + 120 * label,) * 3, (side, side), index)[..., 0]
                Image.fromarray(grey, mode="L").save(root / split / name / f"{index}.png")
    return root


def entries(cache: Path) -> list[str]:
    """The cache's entries, whole or partial: everything but its lock files."""
    return sorted(path.name for path in cache.iterdir() if path.name != "locks") if cache.exists() else []


def config_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def test_an_image_folder_of_mixed_formats_trains_from_a_cache_decoded_once(tmp_path, monkeypatch):
    data, cache = image_folder(tmp_path / "photos"), tmp_path / "cache"
    run_dir, stdout, _ = train_here(tmp_path, data, *QUICK, "--decode-workers", "2", "--cache-dir", str(cache))
    info = config_json(run_dir)
    assert info["class_names"] == ["cat", "dog"] and info["model"]["in_channels"] == 3
    assert info["source_image_size"] == [32, 32] and info["train_samples"] == 12 and info["test_samples"] == 4
    assert info["data"]["cache_hit"] is False and info["data"]["layout"] == "imagefolder"
    assert len(info["data"]["channel_mean"]) == 3 and all(0 < value < 1 for value in info["data"]["channel_std"])
    assert "decoding 16 images" in stdout and len(entries(cache)) == 1 and info["background"] is None
    photo = next((data / "test" / "dog").glob("*.jpg"))
    code, predicted, stderr = run_main(predict.main, ["--checkpoint", str(run_dir), "--json", str(photo)])
    assert code == 0 and {entry["class"] for entry in json.loads(predicted)["top"]} == {"cat", "dog"}, stderr

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached dataset was decoded again")
    monkeypatch.setattr(decode_module, "decode_into", no_decoding)
    monkeypatch.setattr(decode_module, "probe", no_decoding)
    again, stdout, _ = train_here(tmp_path, data, *QUICK, "--cache-dir", str(cache), name="again")
    assert config_json(again)["data"]["cache_hit"] is True and "decoding" not in stdout
    assert config_json(again)["data"]["fingerprint"] == info["data"]["fingerprint"]
    monkeypatch.undo()

    touched = next((data / "train" / "dog").glob("*.png"))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    rebuilt, _, _ = train_here(tmp_path, data, *QUICK, "--cache-dir", str(cache), name="touched")
    assert config_json(rebuilt)["data"]["cache_hit"] is False
    assert config_json(rebuilt)["data"]["fingerprint"] != info["data"]["fingerprint"] and len(entries(cache)) == 2


def test_an_older_config_json_without_a_data_record_still_reads_and_evaluate_reuses_the_cache(tmp_path):
    from vgg_dist import evaluate
    from vgg_dist.store.run_files import read_run_info
    data = grey_folder(tmp_path / "grey")
    run_dir, _, _ = train_here(tmp_path, data, *QUICK, "--cache-dir", str(tmp_path / "cache"))
    code, stdout, stderr = run_main(evaluate.main, ["--checkpoint", str(run_dir)])
    assert code == 0 and json.loads(stdout.splitlines()[-1])["test_samples"] == 4, stderr
    assert "decoding" not in stdout and len(entries(tmp_path / "cache")) == 1
    values = config_json(run_dir)
    assert values["data"]["cache_hit"] is False
    del values["data"]
    (run_dir / "config.json").write_text(json.dumps(values))
    assert read_run_info(run_dir).data is None


def test_normalize_dataset_records_the_training_statistics_and_evaluate_reproduces_the_run(tmp_path, tiny_data):
    from vgg_dist import evaluate
    from vgg_dist.data.sources import channel_stats, load_from_dir
    data = image_folder(tmp_path / "photos")
    run_dir, _, _ = train_here(tmp_path, data, *QUICK, "--normalize", "dataset", "--cache-dir", str(tmp_path / "cache"))
    info = config_json(run_dir)
    assert info["model"]["input_mean"] == info["data"]["channel_mean"] and len(info["model"]["input_std"]) == 3
    code, stdout, stderr = run_main(evaluate.main, ["--checkpoint", str(run_dir)])
    assert code == 0, stderr
    assert json.loads(stdout.splitlines()[-1])["test_acc"] == info["final_metrics"]["test_acc"]
    # IDX files carry no record: their statistics are computed from the training split, the same way.
    idx_run, _, _ = train_here(tmp_path, tiny_data, *QUICK, "--normalize", "dataset", name="idx")
    train_images = load_from_dir(tiny_data, tuple("0123456789")).train.images.numpy()
    assert config_json(idx_run)["model"]["input_mean"] == channel_stats(train_images)[0]
    assert config_json(run_dir.parent / "idx")["model"]["input_std"] == channel_stats(train_images)[1]


def test_every_augmentation_and_tta_run_on_colour_images(tmp_path):
    """The fast recipe (crops, flips, flip TTA, standardised input) with erasing, TrivialAugment, CutMix and
    the weight EMA on top, on 3-channel images at a stored size that is not the model's."""
    data = image_folder(tmp_path / "photos")
    run_dir, stdout, _ = train_here(tmp_path, data, "--recipe", "fast", *QUICK, "--random-erase", "0.5", "--aa",
                                    "trivial", "--cutmix", "1.0", "--model-ema", "--cache-dir", str(tmp_path / "cache"))
    info = config_json(run_dir)
    assert info["model"]["in_channels"] == 3 and len(info["model"]["input_mean"]) == 3
    assert info["flags"]["tta"] is True and 0 <= info["final_metrics"]["test_acc"] <= 1


def load(data_dir: Path, cache: Path, **options):
    return load_dataset("fashion_mnist", data_dir, None, DecodeOptions(cache_dir=str(cache), decode_workers=1,
                                                                       **options))


def test_grey_images_get_one_channel_at_their_own_size_unless_told(tmp_path):
    data = grey_folder(tmp_path / "grey", side=16)
    grey = load(data, tmp_path / "cache")
    assert grey.train.images.shape == (8, 1, 16, 16) and grey.test.images.shape == (4, 1, 16, 16)
    assert sorted(grey.train.labels.tolist()) == [0] * 4 + [1] * 4
    forced = load(data, tmp_path / "cache", channels=3, data_size=8)
    assert forced.train.images.shape == (8, 3, 8, 8)
    assert (forced.train.images[:, 0] == forced.train.images[:, 2]).all()


def test_a_non_square_image_is_resized_on_its_shorter_side_then_centre_cropped(tmp_path):
    root = tmp_path / "wide"
    for split in ("train", "test"):
        for name, value in (("a", 0), ("b", 1)):
            (root / split / name).mkdir(parents=True)
            wide = np.zeros((10, 30), dtype=np.uint8)
            wide[:, 10:20] = 255  # only the centre third is white: a centre crop is all white
            Image.fromarray(wide, mode="L").save(root / split / name / "w.png")
            Image.fromarray(np.full((10, 10), value, np.uint8), mode="L").save(root / split / name / "s.png")
    loaded = load(root, tmp_path / "cache", data_size=10)
    assert loaded.train.images.shape == (4, 1, 10, 10)
    wide_ones = [image for image in loaded.train.images if int(image.max()) == 255]
    assert len(wide_ones) == 2 and all(int(image.min()) == 255 for image in wide_ones)  # the crop is all white


def test_val_is_accepted_for_test(tmp_path):
    loaded = load(image_folder(tmp_path / "photos", per_class=2, test_name="val"), tmp_path / "cache")
    assert len(loaded.test) == 4 and loaded.in_channels == 3


WRITE_HUB_DATA = """
import sys, numpy as np, datasets
from PIL import Image
root, layout = sys.argv[1], sys.argv[2]
features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"]),
                              "coarse": datasets.ClassLabel(names=["fluffy", "wet"])})
def split(count, seed):
    rng = np.random.default_rng(seed)
    labels = [index % 3 for index in range(count)]
    images = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in labels]
    return datasets.Dataset.from_dict({"img": images, "label": labels, "coarse": [int(l == 2) for l in labels]},
                                      features=features)
if layout == "parquet":
    import os; os.makedirs(f"{root}/data")
    split(9, 0).to_parquet(f"{root}/data/train-00000-of-00001.parquet")
    split(6, 1).to_parquet(f"{root}/data/test-00000-of-00001.parquet")
else:
    datasets.DatasetDict(train=split(9, 0), validation=split(6, 1)).save_to_disk(root)
"""


def hub_data(root: Path, layout: str) -> Path:
    env = {**os.environ, "HF_HOME": str(root.parent / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", WRITE_HUB_DATA, str(root), layout], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return root


def test_a_parquet_folder_with_two_label_columns_needs_label_column(tmp_path):
    data, cache = hub_data(tmp_path / "pq", "parquet"), tmp_path / "cache"
    _, _, stderr = train_here(tmp_path, data, *QUICK, "--cache-dir", str(cache), expect=2)
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert "several ClassLabel columns (label, coarse)" in stderr and "--label-column" in stderr
    assert entries(cache) == []
    run_dir, _, _ = train_here(tmp_path, data, *QUICK, "--cache-dir", str(cache), "--label-column", "coarse",
                               name="coarse")
    info = config_json(run_dir)
    assert info["class_names"] == ["fluffy", "wet"] and info["model"]["in_channels"] == 3
    assert info["source_image_size"] == [12, 12] and info["data"]["layout"] == "parquet"


def test_a_save_to_disk_folder_trains_with_validation_as_its_test_split(tmp_path):
    data = hub_data(tmp_path / "saved", "save_to_disk")
    run_dir, _, _ = train_here(tmp_path, data, *QUICK, "--cache-dir", str(tmp_path / "cache"),
                               "--label-column", "label")
    info = config_json(run_dir)
    assert info["class_names"] == ["cat", "dog", "eel"] and info["test_samples"] == 6
    assert info["data"]["layout"] == "save_to_disk"


def truncated(root: Path) -> str:
    victim = next((root / "train" / "cat").glob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return str(victim)


def empty_class(root: Path) -> str:
    (root / "train" / "cow").mkdir()
    return f"{root / 'train' / 'cow'}: class folder holds no images"


def unknown_test_class(root: Path) -> str:
    (root / "test" / "eel").mkdir()
    Image.new("RGB", (8, 8)).save(root / "test" / "eel" / "1.png")
    return "test/ has classes that train/ lacks (eel)"


def empty_split(root: Path) -> str:
    for folder in (root / "test").iterdir():
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    return "holds no class folders, so the split has no images"


def class_names_file(root: Path) -> str:
    (root / "names.txt").write_text("a\nb\n")
    return "--class-names applies to IDX files"


def no_layout(root: Path) -> str:
    (root / "train").rename(root / "training")
    return "expected one of: Zalando's four IDX files"


REFUSALS = {"truncated image": truncated, "empty class folder": empty_class, "test class not in train":
            unknown_test_class, "split with no images": empty_split, "no known layout": no_layout,
            "--class-names on a folder": class_names_file}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_input_is_one_line_exit_2_and_no_cache_entry(tmp_path, case):
    data, cache = image_folder(tmp_path / "photos"), tmp_path / "cache"
    expected = REFUSALS[case](data)
    names = ["--class-names", str(data / "names.txt")] if (data / "names.txt").exists() else []
    run_dir, _, stderr = train_here(tmp_path, data, *QUICK, *names, "--cache-dir", str(cache), expect=2)
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and expected in stderr, stderr
    assert entries(cache) == [] and not run_dir.exists()


def test_skip_bad_images_leaves_them_out_and_says_which(tmp_path):
    data, cache = image_folder(tmp_path / "photos"), tmp_path / "cache"
    victim = truncated(data)
    run_dir, _, _ = train_here(tmp_path, data, *QUICK, "--cache-dir", str(cache), "--skip-bad-images")
    record = config_json(run_dir)["data"]
    assert record["skipped_images"] == 1 and record["skipped_paths"] == [victim]
    assert config_json(run_dir)["train_samples"] == 11


def test_a_damaged_cache_file_is_rebuilt_with_a_notice(tmp_path, capsys):
    data, cache = grey_folder(tmp_path / "grey"), tmp_path / "cache"
    first = load(data, cache)
    expected = first.train.images.clone()
    entry, = (cache / name for name in entries(cache))
    array = entry / "train_images.npy"
    array.write_bytes(array.read_bytes()[:-7])
    capsys.readouterr()
    again = load(data, cache)
    assert "are damaged (train_images.npy holds" in capsys.readouterr().out
    assert again.record.cache_hit is False and (again.train.images == expected).all()
    assert load(data, cache).record.cache_hit is True


def test_a_bad_column_flag_names_the_candidates(tmp_path):
    data = hub_data(tmp_path / "pq", "parquet")
    with pytest.raises(UsageError, match="--image-column photo: not an Image column .* its Image columns: img"):
        load(data, tmp_path / "cache", image_column="photo", label_column="label")


BUILD = """
import sys
from pathlib import Path
from vgg_dist.data.cache import DecodeOptions
from vgg_dist.data.sources import load_dataset
data = load_dataset("fashion_mnist", Path(sys.argv[1]), None, DecodeOptions(cache_dir=sys.argv[2], decode_workers=2))
print("HIT" if data.record.cache_hit else "BUILT", tuple(data.train.images.shape))
"""


def test_two_runs_starting_on_one_uncached_folder_decode_it_once(tmp_path):
    data, cache = image_folder(tmp_path / "photos"), tmp_path / "cache"
    env = quiet_env(PYTHONPATH=str(REPO))
    runs = [subprocess.Popen([sys.executable, "-c", BUILD, str(data), str(cache)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    last_lines = sorted(stdout.splitlines()[-1] for stdout, _ in outputs)
    assert last_lines == ["BUILT (12, 3, 224, 224)", "HIT (12, 3, 224, 224)"]
    assert sum("decoding 16 images" in stdout for stdout, _ in outputs) == 1 and len(entries(cache)) == 1


def test_a_disk_that_fills_during_the_build_is_one_line_and_leaves_no_entry(tmp_path):
    from conftest import mounted_tmpfs
    with mounted_tmpfs(tmp_path / "disk", "1m") as disk:
        data = image_folder(tmp_path / "photos")  # 16 images of 3x224x224 bytes: 2.4 MB
        _, _, stderr = train_here(tmp_path, data, *QUICK, "--cache-dir", str(disk / "cache"), "--data-size", "224",
                                  expect=2)
        assert stderr.count("\n") == 1 and "no space left on the device holding" in stderr, stderr
        assert entries(disk / "cache") == []


@pytest.mark.slow
def test_two_launched_processes_share_one_decode(tmp_path):
    from conftest import train
    data, cache = image_folder(tmp_path / "photos"), tmp_path / "cache"
    run_dir, result = train(tmp_path, data, *TINY_MODEL, "--epochs", "1", "--batch-size", "4", "--cache-dir",
                            str(cache), num_processes=2)
    assert result.stdout.count("decoding 16 images") == 1 and len(entries(cache)) == 1
    assert config_json(run_dir)["data"]["cache_hit"] is False and config_json(run_dir)["train_samples"] == 12


def test_an_image_over_the_pixel_limit_is_refused_naming_it(tmp_path, monkeypatch):
    data, cache = image_folder(tmp_path / "photos"), tmp_path / "cache"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 50x36 RGBA files are over twice that
    _, _, stderr = train_here(tmp_path, data, *QUICK, "--cache-dir", str(cache), expect=2)
    assert stderr.count("\n") == 1 and "too many to decode safely; shrink it first" in stderr, stderr
    assert str(data / "train" / "cat") in stderr and entries(cache) == []


def test_images_are_stored_in_one_fixed_mixed_order_so_held_out_rows_hold_every_class(tmp_path):
    data = image_folder(tmp_path / "photos", per_class=20)
    first, second = load(data, tmp_path / "cache"), load(data, tmp_path / "cache")
    labels = first.train.labels.tolist()
    assert sorted(labels) != labels and set(labels[:10]) == set(labels[-10:]) == {0, 1}
    assert torch.equal(first.train.labels, second.train.labels)  # the same order every run


def test_a_class_folder_that_is_a_link_is_read_and_fingerprinted_through_it(tmp_path):
    data, store = grey_folder(tmp_path / "grey"), tmp_path / "store"
    (data / "train" / "a").rename(store)
    (data / "train" / "a").symlink_to(store)
    first = load(data, tmp_path / "cache")
    assert len(first.train) == 8 and first.record.cache_hit is False
    Image.new("L", (16, 16), 90).save(store / "added.png")  # a change behind the link
    again = load(data, tmp_path / "cache")
    assert len(again.train) == 9 and again.record.cache_hit is False


def test_custom_split_names_need_no_train_folder(tmp_path):
    data = grey_folder(tmp_path / "grey")
    (data / "train").rename(data / "fit")
    (data / "test").rename(data / "holdout")
    loaded = load(data, tmp_path / "cache", train_split="fit", test_split="holdout")
    assert len(loaded.train) == 8 and len(loaded.test) == 4


def test_a_constant_channel_cannot_be_standardised_and_says_so_in_one_line(tmp_path):
    for split, count in (("train", 4), ("test", 2)):
        for name in ("a", "b"):
            (tmp_path / "flat" / split / name).mkdir(parents=True)
            for index in range(count):
                Image.new("L", (8, 8), 128).save(tmp_path / "flat" / split / name / f"{index}.png")
    _, _, stderr = train_here(tmp_path, tmp_path / "flat", *QUICK, "--normalize", "dataset", "--cache-dir",
                              str(tmp_path / "cache"), expect=2)
    assert stderr.count("\n") == 1 and "std 0" in stderr and "--normalize none" in stderr


def test_a_floating_point_image_is_refused_naming_it(tmp_path):
    data = grey_folder(tmp_path / "grey")
    victim = data / "train" / "a" / "float.tif"
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32), mode="F").save(victim)
    _, _, stderr = train_here(tmp_path, data, *QUICK, "--cache-dir", str(tmp_path / "cache"), expect=2)
    assert stderr.count("\n") == 1 and str(victim) in stderr and "floating-point" in stderr


def test_evaluate_refuses_data_whose_classes_are_not_the_models(tmp_path):
    from vgg_dist import evaluate
    run_dir, _, _ = train_here(tmp_path, grey_folder(tmp_path / "grey"), *QUICK, "--cache-dir", str(tmp_path / "c"))
    other = image_folder(tmp_path / "photos")
    code, _, stderr = run_main(evaluate.main, ["--checkpoint", str(run_dir), "--data-dir", str(other)])
    assert code == 2 and "are not the model's" in stderr and stderr.count("\n") == 1


def test_a_relative_data_dir_is_recorded_whole_and_a_folder_run_is_named_by_its_folder(tmp_path, monkeypatch):
    data = grey_folder(tmp_path / "grey")
    monkeypatch.chdir(tmp_path)
    run_dir, _, _ = train_here(tmp_path, Path("grey"), *QUICK, "--cache-dir", str(tmp_path / "cache"))
    info = config_json(run_dir)
    assert info["flags"]["data_dir"] == str(data) and info["data_source"] == str(data)
    assert info["dataset"] == "grey" and info["flags"]["dataset"] == "fashion_mnist"
    from vgg_dist.hub import model_card
    from vgg_dist.store.run_files import read_run_info
    card = model_card(read_run_info(run_dir), None, False, 0)
    assert "fashion_mnist" not in card and "datasets:" not in card.split("---")[1] and " on grey" in card
