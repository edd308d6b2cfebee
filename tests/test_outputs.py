"""What a user sees and keeps: progress, curves, TensorBoard, the per-class report, predict, config files."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL, TRAIN_SCRIPT, read_weights, run_bounded, train
from vgg_dist import artifacts
from vgg_dist.data import to_model_input
from vgg_dist.predict import main as predict_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_data):
    run_dir, result = train(tmp_path_factory.mktemp("outputs"), tiny_data, *TINY_MODEL, "--epochs", "2",
                            "--batch-size", "8", "--report-to", "tensorboard", "--progress", num_processes=2)
    return run_dir, result


def test_curves_are_written_as_real_pictures(two_process_run):
    run_dir, _ = two_process_run
    png = (run_dir / "curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert b"<svg" in (run_dir / "curves.svg").read_bytes()[:500]
    with Image.open(run_dir / "curves.png") as image:
        assert image.size[0] >= 600 and image.size[1] >= 400
    points = [json.loads(line) for line in (run_dir / "train_curve.jsonl").read_text().splitlines()]
    assert points and all(0 < p["epoch"] <= 2 for p in points) and any(p["epoch"] % 1 for p in points)


def test_report_counts_every_test_image_once_under_two_processes(two_process_run):
    run_dir, _ = two_process_run
    report = json.loads((run_dir / "report.json").read_text())
    matrix = report["confusion"]["matrix"]
    assert sum(map(sum, matrix)) == report["test_samples"] == 77
    assert [c["class"] for c in report["classes"]][:2] == ["T-shirt/top", "Trouser"]
    assert sum(c["support"] for c in report["classes"]) == 77
    final = json.loads((run_dir / "config.json").read_text())["final_metrics"]
    assert report["test_acc"] == final["test_acc"]
    assert (run_dir / "confusion.png").read_bytes().startswith(PNG_MAGIC)


def test_tensorboard_events_hold_the_logged_scalars(two_process_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, _ = two_process_run
    event_files = [path for path in (run_dir / "tensorboard").rglob("events.out.tfevents.*")
                   if path.parent.name == "vgg_dist"]
    assert len(event_files) == 1
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    assert {"train/loss", "train/acc", "test/acc", "perf/examples_per_sec"} <= set(events.Tags()["scalars"])
    test_acc = [(event.step, event.value) for event in events.Scalars("test/acc")]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in test_acc] == [1, 2]
    assert [value for _, value in test_acc] == pytest.approx([m["test_acc"] for m in metrics])


def test_progress_bar_is_drawn_by_one_process_only(two_process_run):
    _, result = two_process_run
    # Each bar draws its 0% state once when it opens; two processes drawing would show two.
    assert len(re.findall(r"train epoch 1/2:\s+0%", result.stdout)) == 1
    assert result.stdout.count("epoch 1/2: loss") == 1


def test_no_progress_bar_when_output_is_not_a_terminal(tmp_path, tiny_data):
    _, result = train(tmp_path, tiny_data, *TINY_MODEL, "--epochs", "1", "--batch-size", "16")
    assert "train epoch" not in result.stdout and "epoch 1/1: loss" in result.stdout


# ---- predict -----------------------------------------------------------------------------------------

def _write_images(directory: Path) -> dict[str, Path]:
    generator = torch.Generator().manual_seed(3)
    paths = {}
    for name, mode, size in [("gray.png", "L", (37, 53)), ("color.jpg", "RGB", (300, 120)),
                             ("color.png", "RGBA", (28, 28)), ("gray.jpg", "L", (101, 99))]:
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = torch.randint(0, 256, (size[1], size[0], channels), generator=generator, dtype=torch.uint8)
        image = Image.fromarray(pixels.squeeze(-1).numpy() if channels == 1 else pixels.numpy(), mode)
        image.save(directory / name)
        paths[name] = directory / name
    return paths


def _expected_class(model, path: Path, image_size: int) -> int:
    """The model's own forward pass on the equivalent tensor: grey levels at 28x28, then the training resize."""
    with Image.open(path) as image:
        small = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    tensor = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(1, 1, 28, 28)
    with torch.no_grad():
        return int(model(to_model_input(tensor, image_size)).argmax())


def test_predict_matches_the_models_forward_pass(two_process_run, tmp_path, capsys):
    run_dir, _ = two_process_run
    paths = _write_images(tmp_path)
    model, config = artifacts.load_model(run_dir)
    assert predict_main(["--checkpoint", str(run_dir), "--json", "--top-k", "2", *map(str, paths.values())]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [str(path) for path in paths.values()]
    for line, path in zip(lines, paths.values()):
        assert len(line["top"]) == 2 and line["top"][0]["probability"] >= line["top"][1]["probability"]
        assert line["top"][0]["index"] == _expected_class(model, path, config["model"]["image_size"])
        assert line["top"][0]["class"] == config["class_names"][line["top"][0]["index"]]


def test_predict_console_script_prints_top_classes(two_process_run, tmp_path):
    run_dir, _ = two_process_run
    image = _write_images(tmp_path)["gray.png"]
    script = Path(sys.executable).parent / "vgg-dist-predict"
    result = run_bounded([str(script), "--checkpoint", str(run_dir), str(image)], timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{image}: ") and result.stdout.count(",") == 2


@pytest.mark.parametrize("case", ["not an image", "missing image", "missing checkpoint"])
def test_predict_refuses_bad_input_with_one_line(two_process_run, tmp_path, capsys, case):
    run_dir, _ = two_process_run
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a picture")
    args = {"not an image": [str(run_dir), str(bad)],
            "missing image": [str(run_dir), str(tmp_path / "nowhere.jpg")],
            "missing checkpoint": [str(tmp_path / "no-run"), str(bad)]}[case]
    assert predict_main(["--checkpoint", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert {"not an image": "not a readable image", "missing image": "file not found",
            "missing checkpoint": "--checkpoint"}[case] in err


# ---- config files ----------------------------------------------------------------------------------

def test_config_file_sets_defaults_and_flags_win(tmp_path, tiny_data):
    config = tmp_path / "run.yaml"
    config.write_text(f"data-dir: {tiny_data}\nepochs: 3\nbatch_size: 16\nimage_size: 32\nwidth_divisor: 16\n"
                      f"hidden_size: 64\n")
    result = run_bounded([sys.executable, TRAIN_SCRIPT, "--config", str(config), "--epochs", "1",
                          "--output-dir", str(tmp_path / "run")], timeout=120)
    assert result.returncode == 0, result.stderr
    flags = json.loads((tmp_path / "run" / "config.json").read_text())["flags"]
    assert flags["epochs"] == 1 and flags["batch_size"] == 16 and flags["image_size"] == 32


def test_written_config_reproduces_the_run(tmp_path, tiny_data):
    first, _ = train(tmp_path, tiny_data, *TINY_MODEL, "--epochs", "1", "--batch-size", "16", name="first")
    result = run_bounded([sys.executable, TRAIN_SCRIPT, "--config", str(first / "train_config.yaml"),
                          "--output-dir", str(tmp_path / "again")], timeout=120)
    assert result.returncode == 0, result.stderr
    ours, theirs = read_weights(tmp_path / "again"), read_weights(first)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


@pytest.mark.parametrize("content, message", [
    ("epochs: three\n", "epochs must be int"),
    ("epoch: 3\n", "unknown setting 'epoch'"),
    ("output_dir: runs/x\n", "output_dir is not part of a recipe"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("epochs: [\n", "not readable YAML"),
])
def test_bad_config_file_is_refused(tmp_path, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    result = run_bounded([sys.executable, TRAIN_SCRIPT, "--config", str(config)], timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"--config {config}" in result.stderr and message in result.stderr
