"""Flags, config files and recipes, checked in this process against the functions that validate them.

The one-line, exit-2 contract of each command is tested once per command with a real process
(test_train, test_outputs, test_bench, test_model); here every bad input meets `parse_config` itself.
"""

import dataclasses
import os
import time

import pytest

from vgg_dist.config import TrainConfig, parse_config, recipe_names
from vgg_dist.errors import UsageError


def parse(*argv: str) -> TrainConfig:
    return parse_config(list(argv), prog="train", description="test")


def refusal(*argv: str) -> str:
    with pytest.raises(UsageError) as caught:
        parse(*argv)
    message = str(caught.value)
    assert "\n" not in message
    return message


BAD_FLAGS = {
    "zero epochs": (["--epochs", "0"], "--epochs must be a positive integer"),
    "negative lr": (["--lr", "-1"], "--lr must be a positive number"),
    "lr beyond float32": (["--lr", "1e308"], "--lr must be a positive number no larger than 3.4e+38"),
    "unknown arch": (["--arch", "vgg12"], "--arch 'vgg12' is unknown"),
    "image size": (["--image-size", "100"], "--image-size must be a multiple of 32"),
    "width divisor": (["--width-divisor", "0"], "--width-divisor must be a positive integer"),
    "not a number": (["--batch-size", "lots"], "argument --batch-size: invalid int value"),
    "unknown flag": (["--epoch", "3"], "unrecognized arguments"),
    "missing data dir": (["--data-dir", "/nonexistent/vgg"], "--data-dir /nonexistent/vgg: not a directory"),
    "negative seed": (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    "huge seed": (["--seed", "99999999999999"], "--seed must be in [0, 4294967295]"),
    "huge dist timeout": (["--dist-timeout", "100000000000000"], "--dist-timeout must be in [1, 604800]"),
    "negative weight decay": (["--weight-decay", "-0.1"], "--weight-decay must be in [0, 1]"),
    "label smoothing 1": (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1)"),
    "warmup longer than the run": (["--warmup-epochs", "11"], "--warmup-epochs 11.0 must be between 0 and --epochs 10"),
    "nesterov without momentum": (["--nesterov"], "--nesterov needs a --momentum above 0"),
    "unknown recipe": (["--recipe", "fastest"], "--recipe 'fastest' is unknown; choose one of best, chapter, fast"),
    "unknown schedule": (["--lr-schedule", "step"], "argument --lr-schedule: invalid choice: 'step'"),
    "flip probability": (["--hflip", "1.5"], "--hflip must be in [0, 1]"),
    "crop padding": (["--random-crop-padding", "40"], "--random-crop-padding must be in [0, 16]"),
    "zero clip": (["--clip-grad-norm", "0"], "--clip-grad-norm must be a positive number"),
    "ema decay 1": (["--model-ema-decay", "1"], "--model-ema-decay must be in [0, 1)"),
    "val split 1": (["--val-split", "1"], "--val-split must be in [0, 1)"),
    "resume auto alone": (["--resume", "auto"], "--resume auto needs --output-dir"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_are_refused_naming_the_flag(case):
    argv, message = BAD_FLAGS[case]
    assert message in refusal(*argv)


def test_output_dir_that_cannot_be_a_directory_is_refused_before_any_work(tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert "is a file, not a directory" in refusal("--output-dir", str(tmp_path / "a_file" / "run"))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert "cannot be resolved" in refusal("--output-dir", str(tmp_path / "loop" / "run"))
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert "is not writable" in refusal("--output-dir", str(locked / "run"))


@pytest.mark.parametrize("content, message", [
    ("epochs: three\n", "epochs must be int"),
    ("epoch: 3\n", "unknown setting 'epoch'"),
    ("output_dir: runs/x\n", "output_dir is not part of a recipe"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("epochs: [\n", "not readable YAML"),
    ("epochs: null\n", "epochs needs a value (int), not null"),
    ("lr: true\n", "lr must be a finite number, got True"),
])
def test_bad_config_file_is_refused(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    text = refusal("--config", str(path))
    assert text.startswith(f"--config {path}: ") and message in text


def test_config_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("epochs: 3 # für\n".encode("latin-1"))
    assert refusal("--config", str(path)) == f"--config {path}: not UTF-8 text; save it as UTF-8 YAML"


def test_optional_flags_may_be_null_in_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_train_samples: null\nclip_grad_norm: null\n")
    config = parse("--config", str(path))
    assert config.max_train_samples is None and config.clip_grad_norm is None


def test_the_chapter_recipe_is_the_default_and_matches_the_defaults():
    assert parse() == parse("--recipe", "chapter") == TrainConfig()


def test_every_recipe_is_valid_and_named_in_the_config():
    for name in recipe_names():
        config = parse("--recipe", name)
        assert config.recipe == name
    fast = parse("--recipe", "fast")
    assert fast.image_size == 32 and fast.batch_norm and fast.lr_schedule == "onecycle"


def test_flags_override_the_config_file_which_overrides_the_recipe(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: fast\nepochs: 7\nlr: 0.3\n")
    config = parse("--config", str(path), "--lr", "0.1")
    assert config.recipe == "fast" and config.batch_norm  # from the recipe the file names
    assert config.epochs == 7 and config.lr == 0.1
    assert parse("--config", str(path), "--recipe", "best").width_divisor == 1  # the command line's recipe wins


def test_written_train_config_reproduces_the_config(tmp_path):
    import yaml

    from vgg_dist.config import config_file_values
    config = parse("--recipe", "best", "--epochs", "6", "--seed", "4")
    path = tmp_path / "train_config.yaml"
    path.write_text(yaml.safe_dump(config_file_values(config)))
    assert parse("--config", str(path)) == dataclasses.replace(config)


def test_help_lists_recipes_and_choices_and_each_default_once(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines wherever it likes
    for name in recipe_names():
        assert f"{name}: " in text
    assert "{vgg11,vgg13,vgg16,vgg19}" in text and "fashion_mnist, mnist, cifar10, cifar100, or any Hub" in text
    assert "{none,tensorboard,wandb,all}" in text and "{constant,cosine,onecycle}" in text
    assert "(default: None)" not in text
    assert text.count("(default: load from the Hugging Face Hub)") == 1


def test_an_unknown_recipe_named_by_a_config_file_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: fastest\n")
    assert refusal("--config", str(path)) == (f"--config {path}: recipe 'fastest' is unknown; choose one of "
                                              f"best, chapter, fast")


def _alias_bomb(levels: int = 9) -> str:
    """A few hundred bytes of YAML whose aliases expand to 9**levels items."""
    lines = ["a0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)]
    return "\n".join(lines) + f"\nrecipe: *l{levels - 1}\nepochs: *l{levels - 1}\n"


@pytest.mark.parametrize("content, message", [
    (_alias_bomb(), "aliases (*name) are not allowed"),
    ("epochs: 3\nepochs: 5\n", "'epochs' is given twice"),
    ("epochs: 3\nlr: 0.1\nepochs: 5\n", "'epochs' is given twice"),
])
def test_config_files_with_aliases_or_repeated_keys_are_refused_at_once(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert len(content) < 1000
    started = time.monotonic()
    text = refusal("--config", str(path))
    assert time.monotonic() - started < 5 and len(text) < 400  # nothing expanded, into memory or the message
    assert text.startswith(f"--config {path}: not readable YAML") and message in text


def test_a_long_value_is_shortened_in_the_message(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("epochs: [" + ", ".join(["1"] * 20_000) + "]\n")
    text = refusal("--config", str(path))
    assert "epochs must be int" in text and len(text) < 300


@pytest.mark.parametrize("target, message", [("/dev/null", "not a regular file"), (".", "not a regular file")])
def test_a_config_that_is_not_a_regular_file_is_refused(target, message):
    assert refusal("--config", target) == f"--config {target}: {message}"


def test_help_shows_each_flags_default_and_a_recipes_own_values():
    import contextlib
    import io
    for flags, shown in ((["--help"], "(default: 10)"), (["--recipe", "fast", "--help"], "(default: 15)")):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            parse_config(flags, prog="train", description="test")
        epochs = out.getvalue().split("--epochs EPOCHS")[-1].split("--")[0]
        assert shown in " ".join(epochs.split()), epochs


def test_class_names_that_are_not_a_file_say_so(tmp_path):
    assert refusal("--class-names", str(tmp_path)) == f"--class-names {tmp_path}: not a regular file; give a " \
                                                       f"text file with one class name per line"


def test_recipes_beyond_the_chapter_standardise_and_pretrained_weights_get_imagenets_statistics(tmp_path):
    assert parse().normalize == "none" and parse("--recipe", "fast").normalize == "dataset"
    assert parse("--recipe", "best").normalize == "dataset"
    full_size = ["--width-divisor", "1", "--hidden-size", "4096"]
    assert parse("--pretrained", *full_size).normalize == "imagenet"
    assert parse("--pretrained", *full_size, "--recipe", "fast").normalize == "imagenet"
    assert parse("--pretrained", *full_size, "--normalize", "none").normalize == "none"
