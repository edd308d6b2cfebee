"""What a user sees and keeps: progress, curves, TensorBoard, the per-class report, predict, config files."""

import json
import os
import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL, read_weights, run_bounded, run_main, train_here
from vgg_dist import evaluate
from vgg_dist.store import artifacts
from vgg_dist.data.batches import to_model_input
from vgg_dist.data.images import decode
from vgg_dist.predict import main as predict_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_process_run(shared_run):
    return shared_run


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
    assert {"train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "test/loss", "test/acc",
            "perf/examples_per_sec"} <= set(events.Tags()["scalars"])
    test_acc = [(event.step, event.value) for event in events.Scalars("test/acc")]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in test_acc] == [1, 2]
    assert [value for _, value in test_acc] == pytest.approx([m["test_acc"] for m in metrics])


def test_progress_bar_is_drawn_by_one_process_only(two_process_run):
    _, result = two_process_run
    # Each bar draws its 0% state once when it opens; two processes drawing would show two.
    assert len(re.findall(r"train epoch 1/2:\s+0%", result.stdout)) == 1
    assert result.stdout.count("epoch 1/2: loss") == 1


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
    """The model's own forward pass on the file as the run stores images (decoded to grey at 28x28; the
    decoding itself is tested below), then the training resize."""
    tensor = decode(path, 1, (28, 28))[None]
    with torch.no_grad():  # the shared run evaluates with flip TTA, so predict does too
        x = to_model_input(tensor, image_size)
        return int((model(x).softmax(dim=1) + model(x.flip(-1)).softmax(dim=1)).argmax())


def test_predict_matches_the_models_forward_pass(two_process_run, tmp_path, capsys):
    run_dir, _ = two_process_run
    paths = _write_images(tmp_path)
    model, info = artifacts.load_model(run_dir)
    assert predict_main(["--checkpoint", str(run_dir), "--json", "--top-k", "2", "--no-invert",
                         *map(str, paths.values())]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [str(path) for path in paths.values()]
    for line, path in zip(lines, paths.values()):
        assert len(line["top"]) == 2 and line["top"][0]["probability"] >= line["top"][1]["probability"]
        assert line["top"][0]["index"] == _expected_class(model, path, info.model.image_size)
        assert line["top"][0]["class"] == info.class_names[line["top"][0]["index"]]


def _garment_photo(path: Path, light_background: bool, bits: int = 8) -> Path:
    """A 60x40 picture of a plain shape: light on black as Fashion-MNIST draws garments, or dark on white
    as product photos show them; 8 or 16 bits per grey level."""
    import numpy as np
    ink = np.zeros((60, 40))
    ink[10:50, 8:32] = 0.8
    ink[10:20, 0:40] = 0.6  # sleeves
    levels = (1 - ink) if light_background else ink
    top = 65535 if bits == 16 else 255
    Image.fromarray((levels * top).round().astype(np.uint16 if bits == 16 else np.uint8)).save(path)
    return path


def _predict_json(run_dir, *args, capsys):
    code = predict_main(["--checkpoint", str(run_dir), "--json", "--top-k", "10", *map(str, args)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(line)["top"] for line in captured.out.splitlines()], captured.err


def test_a_dark_on_white_photo_is_inverted_and_says_so(two_process_run, tmp_path, capsys):
    # The tests' synthetic images are mid-grey throughout; this run's copy says its training images had a
    # black background, as Fashion-MNIST's do (12.8 is what a real Fashion-MNIST run records).
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(two_process_run[0] / "model.safetensors", run_dir)
    config = json.loads((two_process_run[0] / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "background": 12.8}))
    photo = _garment_photo(tmp_path / "photo.png", light_background=True)
    drawn = _garment_photo(tmp_path / "drawn.png", light_background=False)
    (automatic,), note = _predict_json(run_dir, photo, capsys=capsys)
    assert note == (f"note: {photo} has a background unlike the training images'; inverted it (--no-invert keeps "
                    f"it as it is)\n")
    (forced,), _ = _predict_json(run_dir, "--invert", photo, capsys=capsys)
    (same_as_drawn,), quiet = _predict_json(run_dir, drawn, capsys=capsys)
    assert automatic == forced == same_as_drawn and quiet == ""  # 255 - photo is the drawing, exactly
    (kept,), quiet = _predict_json(run_dir, "--no-invert", photo, capsys=capsys)
    assert kept != automatic and quiet == ""


def test_a_16_bit_photo_predicts_as_its_8_bit_copy(two_process_run, tmp_path, capsys):
    run_dir, _ = two_process_run
    wide = _garment_photo(tmp_path / "wide.png", light_background=False, bits=16)
    narrow = _garment_photo(tmp_path / "narrow.png", light_background=False, bits=8)
    (from_wide, from_narrow), note = _predict_json(run_dir, wide, narrow, capsys=capsys)
    assert note == "" and [e["class"] for e in from_wide] == [e["class"] for e in from_narrow]
    assert [e["probability"] for e in from_wide] == pytest.approx([e["probability"] for e in from_narrow], abs=1e-3)


@pytest.mark.slow
def test_predict_console_script_prints_top_classes_or_one_error_line(two_process_run, tmp_path):
    run_dir, _ = two_process_run
    image = _write_images(tmp_path)["gray.png"]
    script = Path(sys.executable).parent / "vgg-dist-predict"
    result = run_bounded([str(script), "--checkpoint", str(run_dir), str(image)], timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{image}: ") and result.stdout.count(",") == 2
    result = run_bounded([str(script), "--checkpoint", str(run_dir), str(tmp_path / "nowhere.png")], timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {tmp_path / 'nowhere.png'}: file not found\n"


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


def test_written_config_reproduces_the_run(tmp_path, tiny_data):
    first, _, _ = train_here(tmp_path, tiny_data, *TINY_MODEL, "--epochs", "1", "--batch-size", "16",
                             "--recipe", "fast", "--warmup-epochs", "0", name="first")
    again, _, _ = train_here(tmp_path, tiny_data, "--config", str(first / "train_config.yaml"), name="again")
    ours, theirs = read_weights(again), read_weights(first)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert json.loads((again / "config.json").read_text())["flags"]["recipe"] == "fast"


# ---- files anyone can edit or point at: refused in one line -------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height: enough for Pillow to measure it, nothing to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return PNG_MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def test_predict_refuses_a_decompression_bomb_and_a_fifo(two_process_run, tmp_path, capsys):
    run_dir, _ = two_process_run
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(30000, 30000))
    assert predict_main(["--checkpoint", str(run_dir), str(bomb)]) == 2
    assert "pixels, too many to decode safely; shrink it first" in capsys.readouterr().err
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert predict_main(["--checkpoint", str(run_dir), str(fifo)]) == 2  # would block forever if opened
    assert capsys.readouterr().err == f"error: {fifo}: not a regular file\n"


def test_predict_takes_a_checkpoint_directory(two_process_run, tmp_path, capsys):
    run_dir, _ = two_process_run
    image = _write_images(tmp_path)["gray.png"]
    assert predict_main(["--checkpoint", str(run_dir / "checkpoints" / "best"), "--json", str(image)]) == 0
    assert json.loads(capsys.readouterr().out)["image"] == str(image)


EDITED_CONFIGS = {
    "hidden size as text": (lambda c: c["model"].update(hidden_size="64"), "hidden_size must be int"),
    "too few class names": (lambda c: c.update(class_names=["a", "b"]), "class_names must list 10 names"),
    "absurd source size": (lambda c: c.update(source_image_size=[100000, 100000]), "source_image_size must be"),
    "model of another size": (lambda c: c["model"].update(hidden_size=4096), "do not belong together"),
    "no model": (lambda c: c.pop("model"), "config.json: missing field 'model'"),
    "unknown field": (lambda c: c.update(colour="red"), "config.json: unknown field 'colour'"),
}


@pytest.mark.parametrize("case", sorted(EDITED_CONFIGS))
def test_an_edited_config_is_refused_by_evaluate_and_predict(two_process_run, tmp_path, capsys, case):
    run_dir, _ = two_process_run
    edit, message = EDITED_CONFIGS[case]
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    config = json.loads((run_dir / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    image = _write_images(tmp_path)["gray.png"]
    for main, extra in ((predict_main, [str(image)]), (evaluate.main, [])):
        code, _, stderr = run_main(main, ["--checkpoint", str(copy), *extra])
        assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr


def test_evaluate_refuses_a_flag_of_the_wrong_type_in_the_config(two_process_run, tmp_path):
    run_dir, _ = two_process_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    config = json.loads((copy / "config.json").read_text())
    config["flags"]["batch_size"] = "128"
    (copy / "config.json").write_text(json.dumps(config))
    for flags in ([], ["--batch-size", "16"]):  # a damaged config.json is refused whatever else is given
        code, stdout, stderr = run_main(evaluate.main, ["--checkpoint", str(copy), *flags])
        assert code == 2 and stdout == "" and stderr.count("\n") == 1, stderr
        assert f"{copy / 'config.json'}: flags.batch_size must be int, got '128'" in stderr


def test_evaluate_contract_one_line_exit_2(tmp_path):
    result = run_bounded([sys.executable, "-m", "vgg_dist.evaluate", "--checkpoint", str(tmp_path / "none")],
                         timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: --checkpoint ") and result.stderr.count("\n") == 1
