"""torchvision's VGG weights on vgg_dist's model: the same function after the mapping (names, the conv bias
before BatchNorm, the adaptive pool, grey input), a short fine-tuning run from a file, and one-line refusals.
All weights are torchvision's without downloading (weights=None), saved to files by the tests."""

import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from conftest import read_weights, train_here
from vgg_dist.errors import UsageError
from vgg_dist.model import ModelSpec, build_model
from vgg_dist.pretrained import check_fits, download_state, load_pretrained

FULL_WIDTH = ["--width-divisor", "1", "--hidden-size", "4096"]


@pytest.fixture(scope="module")
def vgg11_file(tmp_path_factory):
    """torchvision's vgg11 as torchvision initialises it, saved as a .pth state dict."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pretrained") / "vgg11.pth"
    torch.save(torchvision.models.vgg11(weights=None).state_dict(), path)
    return path


def torchvision_model(name: str, state: dict) -> torch.nn.Module:
    model = getattr(torchvision.models, name)(weights=None)
    model.load_state_dict(state)
    return model.eval()


def with_torchvisions_last_layer(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """vgg_dist's model with torchvision's 1000-class layer put back, so the two give the same logits."""
    model[-1].load_state_dict({"weight": state["classifier.6.weight"], "bias": state["classifier.6.bias"]})
    return model.eval()


def test_a_vgg11_file_gives_torchvisions_logits_before_the_last_layer_is_replaced(vgg11_file):
    state = torch.load(vgg11_file, weights_only=True)
    spec = ModelSpec(width_divisor=1, in_channels=3, num_classes=1000)  # 224 x 224: the 7 x 7 map torchvision pools to
    model = build_model(spec)
    load_pretrained(model, spec, str(vgg11_file))
    assert not torch.equal(model[-1].weight, state["classifier.6.weight"])  # the last layer starts fresh
    with_torchvisions_last_layer(model, state)
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(images), torchvision_model("vgg11", state)(images), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_batchnorm_grey_images_and_other_sizes_map_exactly(tmp_path):
    """vgg11_bn with every tensor random (torchvision starts conv biases at 0, which would hide a lost bias),
    read from .safetensors, on 1-channel 64 x 64 images: a 2 x 2 map that torchvision pools to 7 x 7."""
    torch.manual_seed(1)
    state = torchvision.models.vgg11_bn(weights=None).state_dict()
    for name, tensor in state.items():
        if tensor.is_floating_point():
            state[name] = torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor) * 0.02
    save_file(state, tmp_path / "vgg11_bn.safetensors")
    spec = ModelSpec(width_divisor=1, batch_norm=True, in_channels=1, num_classes=1000, image_size=64)
    model = build_model(spec)
    load_pretrained(model, spec, str(tmp_path / "vgg11_bn.safetensors"))
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ours = with_torchvisions_last_layer(model, state)(grey)
        theirs = torchvision_model("vgg11_bn", state)(grey.expand(2, 3, 64, 64))
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max(), (ours - theirs).abs().max()


def test_a_file_that_does_not_fit_is_refused_naming_the_first_tensor_with_both_shapes(vgg11_file, tmp_path):
    with torch.device("meta"):
        vgg13 = torchvision.models.vgg13().state_dict()
    spec = ModelSpec(width_divisor=1)
    with pytest.raises(UsageError, match=r"has no tensor features\.3\.weight .*shape \[128, 64, 3, 3\]"):
        check_fits(vgg13, spec, "vgg13.pth")
    state = torch.load(vgg11_file, weights_only=True)
    state["features.3.weight"] = torch.zeros(100, 64, 3, 3)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(UsageError) as refused:
        load_pretrained(build_model(spec), spec, str(tmp_path / "wrong.pth"))
    assert "features.3.weight has shape [100, 64, 3, 3], but torchvision's vgg11 has [128, 64, 3, 3]" in str(refused.value)


def test_bad_pretrained_flags_are_one_line_before_any_work(tmp_path, tiny_data, vgg11_file):
    cases = {("--pretrained", "--width-divisor", "4", "--hidden-size", "4096"): "--width-divisor 1",
             ("--pretrained", "--width-divisor", "1", "--hidden-size", "64"): "--hidden-size 4096",
             ("--pretrained", str(tmp_path / "missing.pth"), *FULL_WIDTH): "file not found"}
    for number, (argv, message) in enumerate(cases.items()):
        _, stdout, stderr = train_here(tmp_path, tiny_data, *argv, name=f"bad{number}", expect=2)
        assert stderr.startswith("error: --pretrained") and message in stderr and stderr.count("\n") == 1, stderr
        assert not (tmp_path / f"bad{number}").exists()


def test_without_network_or_cache_the_line_names_the_local_file_form(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")
    weights = torchvision.models.get_model_weights("vgg11").IMAGENET1K_V1
    monkeypatch.setattr(type(weights), "get_state_dict", offline)
    with pytest.raises(UsageError, match=r"vgg11 ImageNet weights .* pass --pretrained PATH"):
        download_state(ModelSpec(width_divisor=1))


def test_a_short_fine_tuning_run_starts_from_the_file(tmp_path, tiny_data, vgg11_file):
    """1-channel data: the run's first convolution is torchvision's summed over RGB (a tiny learning rate
    keeps two steps from moving it visibly), and its last layer has the dataset's 10 classes."""
    run_dir, stdout, _ = train_here(tmp_path, tiny_data, "--pretrained", str(vgg11_file), *FULL_WIDTH,
                                    "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--lr", "1e-9",
                                    "--max-train-samples", "32", "--max-eval-samples", "16")
    weights, state = read_weights(run_dir), torch.load(vgg11_file, weights_only=True)
    torch.testing.assert_close(weights["0.0.weight"], state["features.0.weight"].sum(1, keepdim=True), atol=1e-6, rtol=0)
    torch.testing.assert_close(weights["9.weight"], state["classifier.3.weight"], atol=1e-6, rtol=0)
    assert weights["12.weight"].shape == (10, 4096)
    assert "test acc" in stdout
    # ImageNet's statistics, averaged for the one grey channel, are recorded and named on the model card.
    from vgg_dist.hub import model_card
    from vgg_dist.store.run_files import read_run_info
    info = read_run_info(run_dir)
    assert (info.model.input_mean, info.model.input_std) == ([0.449], [0.226])
    card = model_card(info, None, False, 0)
    assert f"fine-tuned from the weights in `{vgg11_file}` (`--pretrained`)" in card
    assert "standardised per channel with mean [0.449] and std [0.226]" in card


@pytest.mark.slow
def test_a_short_fine_tuning_run_from_the_file_on_two_processes(tmp_path, tiny_data, vgg11_file):
    """Every process maps the same file and keeps the same fresh last layer: both ranks end with the same
    weights, whose first convolution is still torchvision's summed over RGB."""
    from conftest import train
    run_dir, _ = train(tmp_path, tiny_data, "--pretrained", str(vgg11_file), *FULL_WIDTH, "--image-size", "32",
                       "--epochs", "1", "--batch-size", "16", "--lr", "1e-9", "--max-train-samples", "32",
                       "--max-eval-samples", "16", num_processes=2, timeout=300)
    info = json.loads((run_dir / "config.json").read_text())
    assert info["launch"]["num_processes"] == 2 and info["weights_identical_across_ranks"] is True
    state = torch.load(vgg11_file, weights_only=True)
    torch.testing.assert_close(read_weights(run_dir)["0.0.weight"], state["features.0.weight"].sum(1, keepdim=True),
                               atol=1e-6, rtol=0)
