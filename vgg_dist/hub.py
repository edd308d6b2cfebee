"""`from vgg_dist import VGG`: a trained run as one object that loads like a Hub model and classifies images.

    model = VGG.from_pretrained("runs/20261126-120000")        # a run, RUN/checkpoints/step_N or .../best
    model = VGG.from_pretrained("exports/fashion-vgg")          # a folder `vgg-dist-export --format hub` wrote
    model = VGG.from_pretrained("someone/fashion-vgg")          # that folder uploaded to the Hub
    probabilities = model.predict([Image.open("shoe.png")])    # [N, classes], with the run's preprocessing

It follows huggingface_hub's ModelHubMixin conventions (`from_pretrained`, `save_pretrained`,
`push_to_hub`), but a saved folder is also a vgg_dist run directory: `model.safetensors` with the model
spec in its header and the run's own `config.json`, so `vgg_dist.predict` and `vgg_dist.evaluate` read it
as they read a run, and the weights keep the plain model's names (`0.0.weight`, ...).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin, snapshot_download
from huggingface_hub.repocard_data import EvalResult
from torch import nn

from vgg_dist.data.images import fit_image, fit_to
from vgg_dist.data.sources import DATASETS
from vgg_dist.model import count_parameters
from vgg_dist.pretrained import TORCHVISION
from vgg_dist.store import checkpoint
from vgg_dist.store.artifacts import WEIGHTS_NAME, load_model, save_weights
from vgg_dist.store.files import write_json
from vgg_dist.store.run_files import CONFIG_NAME, REPORT_NAME, RunInfo

CARD_NAME = "README.md"
# Run files a Hub folder carries along: the recipe to reproduce it, the per-class results, the curves.
EXTRA_FILES = ("train_config.yaml", REPORT_NAME, "curves.png", "curves.svg")
# The options ModelHubMixin.from_pretrained hands to `_from_pretrained` that say how to download.
DOWNLOAD_OPTIONS = ("revision", "cache_dir", "force_download", "local_files_only", "token")


class VGG(nn.Module, PyTorchModelHubMixin, library_name="vgg_dist", pipeline_tag="image-classification",
          tags=["vgg", "image-classification", "vgg_dist"]):
    """A trained vgg_dist model with what its run knows: class names, stored image size, preprocessing."""

    def __init__(self, network: nn.Module, info: RunInfo, run_dir: Path | None = None):
        super().__init__()
        self.network, self.info, self.run_dir = network, info, run_dir
        self.weights_from: str | None = None  # a checkpoint's name, when the weights are not the run's final ones
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for model input: float [N, C, S, S] in [0, 1] at the model's image size."""
        return self.network(x)

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    def predict(self, images, tta: bool | None = None) -> torch.Tensor:
        """Class probabilities [N, classes] for PIL images, uint8 tensors [C, h, w], a list of either, or a
        uint8 batch [N, C, h, w]: each brought to the run's channels and stored size as `vgg_dist.predict`
        brings an image file, then resized and scaled as training batches were. `tta` None: as the run
        evaluated. (Unlike the command, no automatic inversion of dark-on-light photos.)"""
        from vgg_dist.predict import predict  # the command's own step, so the two cannot drift apart
        tta = self.info.flags.tta if tta is None else tta
        device = next(self.network.parameters()).device
        return predict(self.network, self.to_stored(images).to(device), self.info.model, tta)

    def to_stored(self, images) -> torch.Tensor:
        """uint8 [N, C, H, W] at the run's channels and stored size."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self._to_stored_one(image) for image in images])

    def _to_stored_one(self, image) -> torch.Tensor:
        channels, size = self.info.model.in_channels, tuple(self.info.source_image_size)
        if not isinstance(image, torch.Tensor):
            return fit_image(image, channels, size)  # a PIL image, converted and fitted as image files are
        if image.dtype != torch.uint8 or image.dim() != 3:
            # Float images could mean 0-1 or 0-255; guessing would silently shift every prediction.
            raise ValueError(f"expected uint8 images [C, h, w], got {image.dtype} {list(image.shape)}")
        if image.shape[0] != channels:
            raise ValueError(f"expected {channels}-channel images, got {image.shape[0]} channels; pass PIL "
                             f"images to have them converted")
        return image.cpu() if tuple(image.shape[1:]) == size else fit_to(image.cpu(), size)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> VGG:
        """A run directory, one of its checkpoints, RUN/checkpoints/best, or a saved Hub folder."""
        network, info = load_model(Path(path))
        model = cls(network, info, _run_dir_of(Path(path))).to(map_location)
        if (Path(path) / checkpoint.MANIFEST).exists() or Path(path).name == "best":
            model.weights_from = Path(path).name  # the card must not pass the run's final figures off as these
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> VGG:
        """A local path as `load` reads it (with vgg_dist's own one-line errors); anything else is a Hub repo id."""
        if _is_local(pretrained_model_name_or_path):
            return cls.load(pretrained_model_name_or_path, kwargs.get("map_location", "cpu"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", **options) -> VGG:
        """A Hub repo id: its files fetched as the mixin's other options ask (revision, cache_dir, token,
        force_download, local_files_only), then loaded as a local folder."""
        download = {name: options[name] for name in DOWNLOAD_OPTIONS if name in options}
        folder = snapshot_download(repo_id=model_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, *EXTRA_FILES],
                                   **download)
        return cls.load(folder, map_location)

    def _save_pretrained(self, save_directory: Path) -> None:
        """The weights with their spec header, the run's config.json, the run files the card refers to,
        and the card (written here, so that saving into an existing folder refreshes it)."""
        save_weights(save_directory / WEIGHTS_NAME, self.network.state_dict(), self.info.model)
        write_json(save_directory / CONFIG_NAME, self.info.to_dict())
        for name in EXTRA_FILES:
            if self.run_dir is not None and (self.run_dir / name).is_file() and self.run_dir != save_directory:
                shutil.copyfile(self.run_dir / name, save_directory / name)
        self.generate_model_card(save_directory).save(save_directory / CARD_NAME)

    def generate_model_card(self, folder: Path | None = None, *args, **kwargs) -> ModelCard:
        report = _read_report(folder or self.run_dir)
        has_curves = folder is not None and (folder / "curves.png").is_file()
        text = model_card(self.info, report, has_curves, count_parameters(self.network))
        if self.weights_from is not None:
            text += (f"\nThese weights are the run's checkpoint `{self.weights_from}`; the results above are the "
                     f"run's final evaluation, of its final weights.\n")
        return ModelCard(text)


def _is_local(name: str | Path) -> bool:
    """A Hub repo id is `name` or `owner/name`; a path that exists, is absolute, starts with `.` or has
    more parts is local (a mistyped run directory should get vgg_dist's message, not the Hub's)."""
    path = Path(name)
    return (path.exists() or path.is_absolute() or str(name).startswith(".") or len(path.parts) > 2
            or path.name == "best")


def _run_dir_of(path: Path) -> Path | None:
    """The folder whose run files (report, curves) describe `path`: itself, or a checkpoint's run."""
    for candidate in (path, path.parent.parent):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    return None


def _read_report(folder: Path | None) -> dict | None:
    if folder is None or not (folder / REPORT_NAME).is_file():
        return None
    try:
        return json.loads((folder / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None  # the card is still useful without the per-class table


def card_metadata(info: RunInfo) -> ModelCardData:
    """The card's YAML front matter: what the Hub indexes and shows beside the card."""
    # A Hub dataset's id links the card to it; a folder of the user's own has none to link.
    hub_id = DATASETS[info.dataset].hub_id if info.dataset in DATASETS else info.dataset
    hub_id = hub_id if "/" in hub_id else None
    results = None
    if info.final_metrics is not None:
        results = [EvalResult(task_type="image-classification", dataset_type=hub_id or info.dataset,
                              dataset_name=info.dataset, dataset_split="test", metric_type="accuracy",
                              metric_value=info.final_metrics.test_acc)]
    return ModelCardData(library_name="vgg_dist", pipeline_tag="image-classification",
                         tags=["vgg", "image-classification", "vgg_dist", "pytorch", info.model.arch],
                         datasets=[hub_id] if hub_id else None, metrics=["accuracy"], model_name=_title(info),
                         eval_results=results)


def _title(info: RunInfo) -> str:
    spec = info.model
    width = "" if spec.width_divisor == 1 else f", channels / {spec.width_divisor}"
    return f"{spec.arch.upper()}{' with BatchNorm' if spec.batch_norm else ''}{width} on {info.dataset}"


def model_card(info: RunInfo, report: dict | None, has_curves: bool, parameters: int) -> str:
    """README.md for the Hub: metadata, then what the model is, how it was trained, how well it does,
    and how to use it."""
    sections = [f"---\n{card_metadata(info).to_yaml()}\n---", f"# {_title(info)}", _card_model(info, parameters),
                _card_training(info), _card_results(info, report, has_curves), _card_usage(info)]
    return "\n\n".join(sections) + "\n"


def _card_model(info: RunInfo, parameters: int) -> str:
    spec, size = info.model, info.source_image_size
    return (f"A VGG image classifier as built in d2l's VGG chapter (Simonyan & Zisserman's {spec.arch}), trained "
            f"with vgg_dist on `{info.dataset}`: {len(info.class_names)} classes, "
            f"{parameters:,} parameters.\n\n"
            f"- architecture: `{spec.arch}`, conv channels divided by {spec.width_divisor}, "
            f"BatchNorm {'on' if spec.batch_norm else 'off'}, two hidden layers of {spec.hidden_size}, "
            f"dropout {spec.dropout}\n"
            f"- input: {spec.in_channels}-channel uint8 images stored at {size[0]}x{size[1]}, resized bilinearly "
            f"to {spec.image_size}x{spec.image_size} and {_standardised(spec)}\n"
            f"- classes: {', '.join(info.class_names)}")


def _standardised(spec) -> str:
    if spec.input_mean is None:
        return "scaled to [0, 1] (no mean/std normalisation)"
    return f"scaled to [0, 1], then standardised per channel with mean {spec.input_mean} and std {spec.input_std}"


def _fine_tuning(flags) -> str:
    """How the weights started, for the card: from torchvision's ImageNet weights, and how they were tuned."""
    if flags.pretrained is None:
        return "from Xavier-uniform initialisation"
    source = ("torchvision's ImageNet weights" if flags.pretrained == TORCHVISION
              else f"the weights in `{flags.pretrained}`")
    tuning = ("only the classifier trained (`--freeze-features`)" if flags.freeze_features else
              f"the convolutions at {flags.feature_lr_scale:g} x the learning rate (`--feature-lr-scale`)")
    return f"fine-tuned from {source} (`--pretrained`), {tuning}"


def _card_training(info: RunInfo) -> str:
    flags, launch = info.flags, info.launch
    return (f"## Training\n\nRecipe `{flags.recipe}`, {_fine_tuning(flags)}: {flags.epochs} epochs, global batch "
            f"{flags.batch_size}, optimizer {flags.optimizer}, "
            f"learning rate {flags.lr} ({flags.lr_schedule}), model EMA {'on' if flags.model_ema else 'off'}, "
            f"flip TTA at evaluation {'on' if flags.tta else 'off'}; trained on {launch.get('num_processes', '?')} "
            f"process(es) on {launch.get('device', '?')}, mixed precision {launch.get('mixed_precision', '?')}; "
            f"data: `{info.data_source}` ({info.train_samples} training images).\n\n"
            f"`train_config.yaml` in this folder holds every resolved flag; this reproduces the recipe:\n\n"
            f"```\naccelerate launch vgg_dist/train.py --config train_config.yaml --output-dir NEW_RUN\n```")


def _card_results(info: RunInfo, report: dict | None, has_curves: bool) -> str:
    final = info.final_metrics
    if final is None:
        return "## Results\n\nThe run has no final evaluation recorded (it did not finish)."
    lines = ["## Results", "",
             f"Test accuracy **{final.test_acc:.4f}** (loss {final.test_loss:.4f}) on {final.test_samples} test "
             f"images after epoch {final.epoch}, step {final.global_step}, as the run's final evaluation measured it."]
    if report is not None:
        lines += ["", "| class | recall | precision | test images |", "|---|---|---|---|"]
        lines += [f"| {row['class']} | {_figure(row['recall'])} | {_figure(row['precision'])} | {row['support']} |"
                  for row in report.get("classes", [])]
    if has_curves:
        lines += ["", "![training curves](curves.png)"]
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _card_usage(info: RunInfo) -> str:
    size = info.source_image_size
    return ("## How to use it\n\n```python\nfrom PIL import Image\nfrom vgg_dist import VGG\n\n"
            "model = VGG.from_pretrained(\"THIS_REPO_OR_FOLDER\")\n"
            "probabilities = model.predict([Image.open(\"image.png\")])\n"
            "print(model.class_names[probabilities.argmax(1).item()])\n```\n\n"
            "The folder is also a vgg_dist run directory: `python -m vgg_dist.predict --checkpoint FOLDER "
            "image.png` and `python -m vgg_dist.evaluate --checkpoint FOLDER` read it. `model(x)` takes model "
            f"input (float, {info.model.image_size}x{info.model.image_size}, {_standardised(info.model)}); `model.predict` takes "
            f"images of any size and fits them to {size[0]}x{size[1]} first, as training images were stored.")

