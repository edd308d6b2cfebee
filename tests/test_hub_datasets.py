"""`--dataset cifar10`, `cifar100` and `OWNER/NAME`: Hub datasets read through the real `datasets` library
and decoded once into the cache.

No network: `datasets.load_dataset("uoft-cs/cifar10")` loads a local folder of that name when the working
directory holds one, exactly as it loads the Hub's copy (the same parquet files under data/, the same
features). Each run is its own process, started in that working directory with HF_HUB_OFFLINE=1 and its own
HF_HOME, because importing `datasets` fixes its offline setting for the whole process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_MODEL, TRAIN_SCRIPT, quiet_env, run_bounded

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
QUICK = [*TINY_MODEL, "--epochs", "1", "--batch-size", "4", "--decode-workers", "1"]

# Writes a Hub-shaped dataset repository: data/{split}-00000-of-00001.parquet for each split, one Image column
# and the ClassLabel columns asked for, from 8x8 (or 12x12) RGB pictures.
WRITE_REPO = """
import json, os, sys, numpy as np, datasets
root, spec = sys.argv[1], json.loads(sys.argv[2])
features = datasets.Features({spec["image"]: datasets.Image(),
                              **{name: datasets.ClassLabel(names=names) for name, names in spec["labels"].items()}})
os.makedirs(f"{root}/data")
for seed, (split, count) in enumerate(spec["splits"].items()):
    rng = np.random.default_rng(seed)
    rows = {spec["image"]: [rng.integers(0, 255, (spec["side"], spec["side"], 3), dtype=np.uint8) for _ in range(count)]}
    for name, names in spec["labels"].items():
        rows[name] = [index % len(names) for index in range(count)]
    rows[spec["image"]] = [datasets.Image().encode_example(image) for image in rows[spec["image"]]]
    datasets.Dataset.from_dict(rows, features=features).to_parquet(f"{root}/data/{split}-00000-of-00001.parquet")
"""


def hub_repo(root: Path, image: str, labels: dict[str, list[str]], splits: dict[str, int], side: int = 8) -> Path:
    spec = {"image": image, "labels": labels, "splits": splits, "side": side}
    env = {**os.environ, "HF_HOME": str(root.parent / "writer_hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", WRITE_REPO, str(root), json.dumps(spec)], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return root


def train_on_hub(workdir: Path, dataset: str, *args: str, name: str = "run") -> tuple[Path, subprocess.CompletedProcess]:
    """One training process in `workdir`, offline, with its own `datasets` cache and vgg_dist cache."""
    run_dir = workdir / name
    command = [sys.executable, TRAIN_SCRIPT, "--dataset", dataset, "--output-dir", str(run_dir), *QUICK, *args]
    return run_dir, run_bounded(command, timeout=180, env=hub_env(workdir), cwd=workdir)


def hub_env(workdir: Path) -> dict[str, str]:
    return quiet_env(HF_HOME=str(workdir / "hf_home"), XDG_CACHE_HOME=str(workdir / "xdg"), PYTHONPATH=str(REPO))


def refused(result: subprocess.CompletedProcess) -> str:
    """The one error line a refusal ends with (after any of `datasets`' own progress lines), checked."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error: ") == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last


def config_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def cache_entries(workdir: Path) -> list[str]:
    cache = workdir / "xdg" / "vgg_dist" / "datasets"
    return sorted(path.name for path in cache.iterdir() if path.name != "locks") if cache.exists() else []


@pytest.mark.slow
def test_cifar10_is_read_through_datasets_decoded_once_then_read_from_the_cache(tmp_path):
    hub_repo(tmp_path / "uoft-cs" / "cifar10", "img", {"label": CIFAR10_NAMES}, {"train": 20, "test": 10})
    run_dir, result = train_on_hub(tmp_path, "cifar10")
    assert result.returncode == 0, result.stderr
    info = config_json(run_dir)
    assert info["data_source"] == "hf://uoft-cs/cifar10" and info["data"]["layout"] == "hub"
    assert info["class_names"] == CIFAR10_NAMES and info["model"]["in_channels"] == 3
    assert info["source_image_size"] == [8, 8] and info["test_samples"] == 10
    assert info["data"]["cache_hit"] is False and "decoding 30 images from hf://uoft-cs/cifar10" in result.stdout
    # evaluate reads the run's own source again, from the cache, and reproduces its accuracy.
    evaluated = run_bounded([sys.executable, "-m", "vgg_dist.evaluate", "--checkpoint", str(run_dir)], timeout=120,
                            env=hub_env(tmp_path), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.splitlines()[-1])["test_acc"] == info["final_metrics"]["test_acc"]
    again, result = train_on_hub(tmp_path, "cifar10", name="again")
    assert result.returncode == 0, result.stderr
    assert config_json(again)["data"]["cache_hit"] is True and "decoding" not in result.stdout
    assert len(cache_entries(tmp_path)) == 1


@pytest.mark.slow
def test_cifar100_trains_on_its_fine_labels_unless_told_otherwise(tmp_path):
    fine, coarse = [f"fine{index}" for index in range(100)], [f"coarse{index}" for index in range(20)]
    hub_repo(tmp_path / "uoft-cs" / "cifar100", "img", {"fine_label": fine, "coarse_label": coarse},
             {"train": 8, "test": 4})
    run_dir, result = train_on_hub(tmp_path, "cifar100")
    assert result.returncode == 0, result.stderr
    assert config_json(run_dir)["model"]["num_classes"] == 100
    run_dir, result = train_on_hub(tmp_path, "cifar100", "--label-column", "coarse_label", name="coarse")
    assert result.returncode == 0, result.stderr
    assert config_json(run_dir)["class_names"] == coarse


def test_any_hub_id_finds_its_columns_and_refuses_a_choice_it_cannot_make(tmp_path):
    hub_repo(tmp_path / "someone" / "pets", "picture", {"species": ["cat", "dog"], "mood": ["calm", "cross"]},
             {"train": 8, "validation": 4})
    _, result = train_on_hub(tmp_path, "someone/pets")
    assert refused(result) == ("error: --dataset someone/pets: several ClassLabel columns (species, mood); name "
                               "the one to use with --label-column")
    assert cache_entries(tmp_path) == []
    # No test split: validation is tested on.
    run_dir, result = train_on_hub(tmp_path, "someone/pets", "--label-column", "mood", name="mood")
    assert result.returncode == 0, result.stderr
    info = config_json(run_dir)
    assert info["class_names"] == ["calm", "cross"] and info["test_samples"] == 4
    assert info["flags"]["test_split"] is None
    _, result = train_on_hub(tmp_path, "someone/pets", "--label-column", "mood", "--test-split", "test", name="no")
    assert "no 'test' split (its splits: train, validation)" in refused(result) and "--test-split" in result.stderr


def test_an_unreachable_hub_without_a_cached_copy_is_one_line_that_says_what_to_do(tmp_path):
    _, result = train_on_hub(tmp_path, "someone/nowhere")
    assert refused(result).startswith("error: --dataset someone/nowhere: no data: the Hub is not reachable")
    assert "--data-dir FOLDER" in result.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_a_malformed_dataset_name_is_refused_before_anything_runs(tmp_path):
    _, result = train_on_hub(tmp_path, "not a name")
    assert "not a built-in dataset" in refused(result) and "OWNER/NAME" in result.stderr


@pytest.mark.slow
def test_two_launched_processes_read_a_hub_dataset_decoded_once(tmp_path):
    from conftest import launch_command
    hub_repo(tmp_path / "uoft-cs" / "cifar10", "img", {"label": CIFAR10_NAMES}, {"train": 16, "test": 6})
    run_dir = tmp_path / "two"
    command = launch_command(2, TRAIN_SCRIPT, "--dataset", "cifar10", "--output-dir", str(run_dir), *QUICK)
    result = run_bounded(command, timeout=240, env=hub_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("decoding 22 images") == 1 and len(cache_entries(tmp_path)) == 1
    info = config_json(run_dir)
    assert info["launch"]["num_processes"] == 2 and info["test_samples"] == 6 and info["data"]["cache_hit"] is False
