import subprocess
import sys

import pytest
import torch

from vgg_dist.model import ARCHITECTURES, MaxPool2x2, ModelSpec, build_model, count_parameters, main, shape_table

# The table d2l's VGG chapter prints for VGG-11 at full width and 224x224.
CHAPTER_TABLE = [
    ("Sequential", [1, 64, 112, 112]),
    ("Sequential", [1, 128, 56, 56]),
    ("Sequential", [1, 256, 28, 28]),
    ("Sequential", [1, 512, 14, 14]),
    ("Sequential", [1, 512, 7, 7]),
    ("Flatten", [1, 25088]),
    ("Linear", [1, 4096]),
    ("ReLU", [1, 4096]),
    ("Dropout", [1, 4096]),
    ("Linear", [1, 4096]),
    ("ReLU", [1, 4096]),
    ("Dropout", [1, 4096]),
    ("Linear", [1, 10]),
]


def test_shape_table_matches_the_chapter():
    spec = ModelSpec(arch="vgg11", width_divisor=1, image_size=224)
    assert shape_table(build_model(spec), spec) == CHAPTER_TABLE


def test_chapter_model_flattens_channels_times_seven_squared():
    spec = ModelSpec()  # the chapter's trained model: channels / 4
    model = build_model(spec)
    assert model[6].in_features == 128 * 7 * 7
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_cli_prints_the_table(capsys):
    assert main(["--arch", "vgg11", "--width-divisor", "1", "--image-size", "224"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Sequential output shape:\t [1, 64, 112, 112]"
    assert out[-2] == "Linear output shape:\t [1, 10]"
    assert out[-1] == "128,806,154 parameters"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("batch_norm", [False, True])
def test_every_parameter_learns_and_nothing_is_nan(arch, batch_norm):
    spec = ModelSpec(arch=arch, width_divisor=16, batch_norm=batch_norm, image_size=64, hidden_size=32,
                     num_classes=7, in_channels=3)
    torch.manual_seed(0)
    model = build_model(spec)
    logits = model(torch.rand(4, 3, 64, 64))
    assert logits.shape == (4, 7)
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    convs = sum(num_convs for num_convs, _ in ARCHITECTURES[arch])
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == convs
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == (convs if batch_norm else 0)


@pytest.mark.parametrize("size", [32, 96, 256])
def test_any_multiple_of_32_works(size):
    spec = ModelSpec(width_divisor=16, image_size=size, hidden_size=16)
    assert build_model(spec)(torch.rand(2, 1, size, size)).shape == (2, 10)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 100, 225])
def test_other_image_sizes_are_refused(size):
    with pytest.raises(ValueError, match="image_size must be a multiple of 32"):
        build_model(ModelSpec(image_size=size))


def test_cli_contract_one_line_exit_2():
    result = subprocess.run([sys.executable, "-m", "vgg_dist.model", "--image-size", "100"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: --image-size must be a multiple of 32 and at least 32 (the model halves it five " \
                            "times), got 100\n"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("batch_norm", [False, True])
def test_parameter_count_without_building_the_model(arch, batch_norm):
    spec = ModelSpec(arch=arch, batch_norm=batch_norm, width_divisor=8, image_size=64, hidden_size=48,
                     num_classes=7, in_channels=3)
    assert spec.parameter_count() == count_parameters(build_model(spec))
    assert ModelSpec().parameter_count() == 43_093_322  # the chapter's model


def test_a_spec_from_json_must_have_the_right_types():
    with pytest.raises(ValueError, match="hidden_size must be int, got '64'"):
        ModelSpec.from_dict({"hidden_size": "64"})
    with pytest.raises(ValueError, match="batch_norm must be bool, got 1"):
        ModelSpec.from_dict({"batch_norm": 1})
    assert ModelSpec.from_dict({"dropout": 0}).dropout == 0


def test_xavier_init_as_the_chapter():
    torch.manual_seed(0)
    model = build_model(ModelSpec(width_divisor=4, image_size=32, hidden_size=256))
    linear = model[6]
    bound = (6 / (linear.in_features + linear.out_features)) ** 0.5
    assert linear.weight.abs().max() <= bound
    # Xavier-uniform fills the whole range; PyTorch's default init (bound 1/sqrt(fan_in)) would not reach it.
    assert linear.weight.abs().max() > 0.95 * bound


def test_saved_names_are_the_plain_models_even_when_compiled():
    from vgg_dist.training.dist import make_accelerator, unwrapped_state_dict
    accelerator = make_accelerator()
    model = build_model(ModelSpec(width_divisor=16, image_size=32, hidden_size=16))
    compiled = torch.compile(accelerator.prepare(model), dynamic=False)  # never run: no compilation happens
    assert list(unwrapped_state_dict(accelerator, compiled)) == list(model.state_dict())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fusable_pool_equals_maxpool_forward_and_backward_where_the_maximum_is_unique(layout):
    # Distinct values (a permutation), so every window has one maximum; then ReLU in front, as in a block.
    values = torch.randperm(2 * 8 * 12 * 16, generator=torch.Generator().manual_seed(0)).float() - 700
    x = values.view(2, 8, 12, 16).contiguous(memory_format=layout)
    ours_in, theirs_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = MaxPool2x2()(torch.relu(ours_in)), torch.nn.MaxPool2d(2)(torch.relu(theirs_in))
    assert torch.equal(ours, theirs)
    assert ours.is_contiguous(memory_format=layout)  # the next convolution gets the layout it wants
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    ours.backward(upstream)
    theirs.backward(upstream)
    assert torch.equal(ours_in.grad, theirs_in.grad)


def test_fusable_pool_splits_the_gradient_of_tied_maxima():
    x = torch.ones(1, 1, 2, 2, requires_grad=True)
    MaxPool2x2()(x).sum().backward()
    assert torch.equal(x.grad, torch.full((1, 1, 2, 2), 0.25))  # MaxPool2d would give 1 to the first


def test_a_model_with_fusable_pools_is_the_same_model():
    spec = ModelSpec(width_divisor=16, image_size=64, hidden_size=32, batch_norm=True)
    torch.manual_seed(0)
    plain = build_model(spec).eval()
    torch.manual_seed(0)
    fusable = build_model(spec, fusable_pool=True).eval()
    assert list(plain.state_dict()) == list(fusable.state_dict())
    x = torch.rand(3, 1, 64, 64)
    assert torch.equal(plain(x), fusable(x))
