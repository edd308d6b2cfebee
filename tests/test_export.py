"""A trained run taken out of vgg_dist: each export format reloaded and compared with PyTorch, the Hub folder
loaded back through VGG.from_pretrained, and every refusal one line, exit 2, nothing written."""

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_MODEL, directory_bytes, quiet_env, run_main, train_here
from vgg_dist import export
from vgg_dist.data.batches import to_model_input
from vgg_dist.store.artifacts import load_model


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tiny_data):
    """One epoch with EMA weights: what an export must take is the average, not the raw weights."""
    run_dir, _, _ = train_here(tmp_path_factory.mktemp("export"), tiny_data, *TINY_MODEL, "--epochs", "1",
                               "--batch-size", "32", "--model-ema")
    return run_dir


def stored_images(count: int, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 1, 28, 28), generator=generator, dtype=torch.uint8)


def pytorch_logits(source, images: torch.Tensor) -> torch.Tensor:
    model, info = load_model(source)
    with torch.no_grad():
        return model(to_model_input(images, info.model.image_size))


def export_ok(*argv) -> str:
    code, stdout, stderr = run_main(export.main, [str(arg) for arg in argv])
    assert code == 0, stdout + stderr
    return stdout


def printed_difference(stdout: str) -> float:
    return float(re.search(r"largest logit difference from PyTorch \(fp32\) on 16 test images: (\S+)", stdout)[1])


def test_onnx_takes_stored_uint8_images_at_any_batch_size_and_gives_pytorchs_logits(ema_run, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the export extra)")
    stdout = export_ok(ema_run, "--format", "onnx", "--output", tmp_path / "model.onnx")
    assert printed_difference(stdout) <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (given,), (returned,) = session.get_inputs(), session.get_outputs()
    assert (given.name, given.type, given.shape[1:]) == ("images", "tensor(uint8)", [1, 28, 28])
    assert returned.name == "logits" and isinstance(given.shape[0], str)  # a named, dynamic batch
    for count in (1, 5):
        images = stored_images(count)
        logits = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        assert logits.shape == (count, 10)
        torch.testing.assert_close(logits, pytorch_logits(ema_run, images), atol=1e-4, rtol=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]  # no side file, no leftovers


def test_an_exported_program_reloads_and_gives_the_ema_weights_logits(ema_run, tmp_path):
    best = ema_run / "checkpoints" / "best"
    stdout = export_ok(best, "--format", "exported", "--output", tmp_path / "model.pt2")
    assert printed_difference(stdout) <= 1e-4
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    images = stored_images(7)
    with torch.no_grad():
        logits = program(images)
    torch.testing.assert_close(logits, pytorch_logits(best, images), atol=1e-5, rtol=0)
    # The checkpoint's raw weights give other logits: the program holds the average evaluation used.
    step, = (ema_run / "checkpoints").glob("step_*")
    raw_model, info = load_model(ema_run)
    from safetensors.torch import load_file
    raw_model.load_state_dict(load_file(step / "model.safetensors"))
    with torch.no_grad():
        assert not torch.allclose(raw_model(to_model_input(images, info.model.image_size)), logits, atol=1e-5)


def test_a_hub_folder_loads_through_from_pretrained_and_its_card_names_the_runs_accuracy(ema_run, tmp_path):
    from PIL import Image

    from vgg_dist import VGG
    from vgg_dist.predict import predict
    folder = tmp_path / "fashion-vgg"
    export_ok(ema_run, "--format", "hub", "--output", folder)
    assert {"model.safetensors", "config.json", "README.md", "curves.png", "report.json",
            "train_config.yaml"} <= {path.name for path in folder.iterdir()}
    model = VGG.from_pretrained(folder)
    images = stored_images(4)
    with torch.no_grad():
        torch.testing.assert_close(model(to_model_input(images, 32)), pytorch_logits(ema_run, images), atol=0, rtol=0)
    card = (folder / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    for line in ("library_name: vgg_dist", "- zalando-datasets/fashion_mnist", "- accuracy", "- image-classification"):
        assert line in front.splitlines(), (line, front)
    final = json.loads((ema_run / "config.json").read_text())["final_metrics"]
    assert f"Test accuracy **{final['test_acc']:.4f}**" in body and f"value: {final['test_acc']}" in front
    recall = json.loads((ema_run / "report.json").read_text())["classes"][0]
    assert recall["class"] in body and "![training curves](curves.png)" in body
    assert "--config train_config.yaml" in body and "VGG.from_pretrained" in body
    # predict() brings PIL images and uint8 tensors of any size to the stored size, as the predict command does.
    run_model, info = load_model(ema_run)
    expected = predict(run_model, images, info.model)
    torch.testing.assert_close(model.predict(images), expected)
    torch.testing.assert_close(model.predict([Image.fromarray(image[0].numpy()) for image in images]), expected)
    assert model.predict(torch.zeros(1, 56, 40, dtype=torch.uint8)).shape == (1, 10)


def test_push_to_hub_without_network_or_token_says_so_in_one_line_and_keeps_the_folder(ema_run, tmp_path,
                                                                                        monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, stderr = run_main(export.main, [str(ema_run), "--format", "hub", "--output", str(tmp_path / "offline"),
                                             "--push-to-hub", "someone/fashion-vgg"])
    assert code == 2 and stderr.count("\n") == 1 and "HF_HUB_OFFLINE" in stderr, stderr
    assert "hf upload someone/fashion-vgg" in stderr and (tmp_path / "offline" / "model.safetensors").is_file()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, _, stderr = run_main(export.main, [str(ema_run), "--format", "hub", "--output", str(tmp_path / "no_token"),
                                             "--push-to-hub", "someone/fashion-vgg"])
    assert code == 2 and stderr.count("\n") == 1 and "no Hugging Face token" in stderr, stderr
    assert (tmp_path / "no_token" / "README.md").is_file()


@pytest.mark.parametrize("case", ["missing run", "unknown format", "output exists", "push without hub",
                                  "wrong suffix", "missing output directory"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(ema_run, tmp_path, case):
    (tmp_path / "taken.onnx").write_bytes(b"someone's model")
    argv = {"missing run": [tmp_path / "no_such_run", "--format", "onnx", "--output", tmp_path / "a.onnx"],
            "unknown format": [ema_run, "--format", "tflite", "--output", tmp_path / "a.tflite"],
            "output exists": [ema_run, "--format", "onnx", "--output", tmp_path / "taken.onnx"],
            "push without hub": [ema_run, "--format", "onnx", "--output", tmp_path / "a.onnx", "--push-to-hub", "a/b"],
            "wrong suffix": [ema_run, "--format", "exported", "--output", tmp_path / "a.onnx"],
            "missing output directory": [ema_run, "--format", "hub", "--output", tmp_path / "no" / "folder"]}[case]
    before, run_before = directory_bytes(tmp_path), directory_bytes(ema_run)
    code, stdout, stderr = run_main(export.main, [str(arg) for arg in argv])
    assert code == 2 and stdout == "" and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert directory_bytes(tmp_path) == before and directory_bytes(ema_run) == run_before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken.onnx"]


def test_an_export_that_does_not_match_pytorch_is_refused_and_not_kept(ema_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no difference passes: the refusal path, made certain
    code, stdout, stderr = run_main(export.main, [str(ema_run), "--format", "exported", "--output",
                                                  str(tmp_path / "model.pt2")])
    assert code == 1 and "largest logit difference" in stdout and stderr.startswith("error: "), stdout + stderr
    assert "nothing written" in stderr and list(tmp_path.iterdir()) == []


def test_importing_vgg_dist_stays_light_and_vgg_loads_on_first_use():
    probe = ("import sys, vgg_dist; assert 'huggingface_hub' not in sys.modules and 'torch' not in sys.modules; "
             "from vgg_dist import VGG; print(VGG.__module__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=quiet_env(),
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "vgg_dist.hub", result.stderr


def test_a_hub_repo_id_is_fetched_with_the_mixins_options_and_loaded_like_a_folder(ema_run, tmp_path, monkeypatch):
    """No network here: the download functions hand back a written folder, as a populated cache would."""
    import huggingface_hub.hub_mixin

    from vgg_dist import VGG, hub
    folder = tmp_path / "fashion-vgg"
    export_ok(ema_run, "--format", "hub", "--output", folder)
    asked = {}
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", lambda **kwargs: str(folder / kwargs["filename"]))
    monkeypatch.setattr(hub, "snapshot_download", lambda **kwargs: asked.update(kwargs) or str(folder))
    model = VGG.from_pretrained("someone/fashion-vgg", revision="v1")
    assert asked["repo_id"] == "someone/fashion-vgg" and asked["revision"] == "v1"
    images = stored_images(2)
    torch.testing.assert_close(model.predict(images), VGG.from_pretrained(ema_run).predict(images), atol=0, rtol=0)


@pytest.mark.slow
def test_the_export_benchmark_writes_its_figures_on_tiny_models(tmp_path):
    """A smoke test of `python -m vgg_dist.bench_export` (no timing is asserted): its JSON holds the
    inference comparison at batch 1 and 64 and each format's export time."""
    from vgg_dist import bench_export
    out = tmp_path / "bench.json"
    code, stdout, stderr = run_main(bench_export.main, ["--shrink", "--min-seconds", "0.01", "--json", str(out)])
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["torch"] and report["onnxruntime"] and report["cpu"] and report["shrink"] is True
    inference = report["inference"]
    assert inference["model"]["image_size"] == 32 and inference["model"]["batch_norm"] is True
    assert {(row["threads"], row["batch_size"]) for row in inference["rows"]} >= {(1, 1), (1, 64)}
    for row in inference["rows"]:
        assert row["pytorch_eager_images_per_sec"] > 0 and row["onnxruntime_images_per_sec"] > 0
    exports = report["export"]
    assert exports["model"]["image_size"] == 224 and exports["model"]["batch_norm"] is False
    for fmt in ("onnx", "exported", "hub"):
        assert exports[fmt]["export_seconds"] > 0 and exports[fmt]["bytes"] > 0, fmt
    assert "ONNX Runtime" in stdout and "hub" in stdout
