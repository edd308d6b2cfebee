"""Take a trained run out of vgg_dist: an ONNX file, a torch.export program, or a folder ready for the Hub.

    python -m vgg_dist.export runs/20261126-120000 --format onnx --output fashion_vgg.onnx
    python -m vgg_dist.export runs/20261126-120000/checkpoints/best --format exported --output fashion_vgg.pt2
    python -m vgg_dist.export runs/20261126-120000 --format hub --output fashion-vgg --push-to-hub you/fashion-vgg

The ONNX file and the exported program take what the run stores: uint8 images N x C x H x W at the run's
stored size (28 x 28 for Fashion-MNIST), any N. The bilinear resize to the model's input size and the
scaling to [0, 1] are inside them, exactly as training batches get them; they return logits (no softmax,
no flip TTA). Each is loaded back after writing and compared with PyTorch on a batch of the run's test
images; the largest logit difference is printed, and over 1e-4 the export is refused and nothing kept.
A run trained with --model-ema exports the averaged weights its evaluation used.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import secrets
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from vgg_dist.cli import FlagParser
from vgg_dist.data.batches import to_model_input
from vgg_dist.errors import UsageError, exit_process, exits_cleanly_on_stop
from vgg_dist.model import ModelSpec
from vgg_dist.store.artifacts import load_model
from vgg_dist.store.run_files import RunInfo

FORMATS = ("onnx", "exported", "hub")
TOLERANCE = 1e-4      # largest logit difference from PyTorch (fp32) an export may show
CHECK_IMAGES = 16     # test images the export is checked on; not the export's batch size, so the batch is shown dynamic
ONNX_OPSET = 18       # the first opset whose Resize has the antialias a downsizing run needs
# Above this the ONNX protobuf (2 GiB limit) cannot hold the weights; they go to a side file instead.
INLINE_WEIGHT_BYTES = 1 << 30
# What each format needs beyond vgg_dist's own dependencies (the `export` extra).
NEEDS = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "exported": (), "hub": ()}
# torch.export.load reads only files named .pt2; the ONNX suffix keeps the two apart.
SUFFIXES = {"onnx": ".onnx", "exported": ".pt2", "hub": ""}


class ExportMismatch(Exception):
    """The written export does not give PyTorch's logits: exit 1, nothing kept."""


class WithPreprocessing(nn.Module):
    """The model with training's input step in front (resize, scale, standardise as `spec` says): uint8
    stored images in, logits out."""

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        return self.model(to_model_input(images, spec.image_size, mean=spec.input_mean, std=spec.input_std))


def check_images(info: RunInfo) -> tuple[torch.Tensor, str]:
    """(uint8 images to compare an export on, what they are): the run's first test images when its data is
    at hand, else seeded random images at the stored size (the comparison is of arithmetic, not accuracy)."""
    from vgg_dist.data.cache import DecodeOptions
    from vgg_dist.data.sources import load_dataset
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the data code's notes are not this command's output
            options = DecodeOptions.from_config(info.flags)  # as the run decoded it: its cache entry is found
            test = load_dataset(info.flags.dataset, info.flags.data_dir, tuple(info.class_names), options).test
        if test.images.shape[1:] == (info.model.in_channels, *info.source_image_size) and len(test.images):
            return test.images[:CHECK_IMAGES].contiguous(), "test images"
    except (UsageError, OSError):
        pass
    generator = torch.Generator().manual_seed(0)
    shape = (CHECK_IMAGES, info.model.in_channels, *info.source_image_size)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8), "random images (test data not found)"


def largest_difference(expected: torch.Tensor, got) -> float:
    return (expected.float() - torch.as_tensor(got).float()).abs().max().item()


def write_onnx(wrapped: WithPreprocessing, example: torch.Tensor, path: Path) -> None:
    """torch.export-based ONNX export (torch's default since 2.9): the TorchScript exporter it replaces is
    deprecated and cannot export the antialiased resize a run whose stored images are larger than its
    model input needs."""
    large = sum(tensor.numel() * tensor.element_size() for tensor in wrapped.state_dict().values()) > INLINE_WEIGHT_BYTES
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(sys.stderr):  # the exporter reports its stages on stdout
        torch.onnx.export(wrapped, (example,), str(path), dynamo=True, input_names=["images"],
                          output_names=["logits"], dynamic_shapes={"images": {0: batch}}, opset_version=ONNX_OPSET,
                          external_data=large, verbose=False)


def run_onnx(path: Path, images: torch.Tensor):
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.numpy()})[0]


def write_exported(wrapped: WithPreprocessing, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(wrapped, (example,), dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, str(path))


def run_exported(path: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.export.load(str(path)).module()(images)


def export_program(model: nn.Module, info: RunInfo, fmt: str, path: Path) -> float:
    """Write `path` in `fmt` ("onnx" or "exported"), load it back and return its largest logit difference
    from PyTorch; ExportMismatch over TOLERANCE."""
    wrapped = WithPreprocessing(model.float().cpu().eval(), info.model).eval()
    images, described = check_images(info)
    write, run = (write_onnx, run_onnx) if fmt == "onnx" else (write_exported, run_exported)
    write(wrapped, images[:2], path)
    with torch.no_grad():
        expected = wrapped(images)
    difference = largest_difference(expected, run(path, images))
    print(f"largest logit difference from PyTorch (fp32) on {len(images)} {described}: {difference:.3g}")
    if not difference <= TOLERANCE:  # `not <=` so that a NaN difference is refused too
        raise ExportMismatch(f"the {fmt} export's logits differ from PyTorch's by {difference:.3g}, over "
                             f"{TOLERANCE:g}; nothing written")
    return difference


def export_hub(source: Path, path: Path) -> None:
    from vgg_dist.hub import VGG
    VGG.load(source).save_pretrained(path)


def push_to_hub(folder: Path, repo_id: str) -> None:
    """Upload a written folder. No token, offline, or a failed upload: one line saying so and how to
    upload later; the folder stays as written."""
    import huggingface_hub
    later = f"the folder {folder} is written; upload it later with `hf upload {repo_id} {folder}`"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UsageError(f"--push-to-hub {repo_id}: the Hub is off (HF_HUB_OFFLINE is set); {later}")
    if huggingface_hub.get_token() is None:
        raise UsageError(f"--push-to-hub {repo_id}: no Hugging Face token (`hf auth login` or HF_TOKEN); {later}")
    try:
        api = huggingface_hub.HfApi()
        api.create_repo(repo_id, exist_ok=True)
        url = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload a vgg_dist model")
    except Exception as error:  # network, auth, validation: each is the same news for the user
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--push-to-hub {repo_id}: upload failed ({reason}); {later}") from None
    print(f"uploaded to {url}")


@contextlib.contextmanager
def staged(output: Path, folder: bool):
    """A path to write `output` at, inside a temporary folder beside it that is moved into place only if the
    block succeeds: a refused or failed export leaves nothing behind, and a reader never sees half of one.
    A file keeps its final name inside the folder, so an ONNX weights side file it names stays findable."""
    temporary = output.with_name(f".{output.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    temporary.mkdir()
    try:
        yield temporary if folder else temporary / output.name
        if folder:
            temporary.rename(output)
        else:
            for written in sorted(temporary.iterdir(), key=lambda item: item.name != output.name):
                written.rename(output.parent / written.name)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = FlagParser(prog="python -m vgg_dist.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="a run directory (its final model.safetensors), one of its checkpoints "
                             "(RUN/checkpoints/step_N), or RUN/checkpoints/best")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx: a .onnx file; exported: a torch.export program (.pt2); hub: a folder with "
                             "model.safetensors, config.json and a README.md model card")
    parser.add_argument("--output", required=True, metavar="PATH", help="file (onnx, exported) or folder (hub) to "
                                                                        "write; it must not exist yet")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="with --format hub: upload the folder to this Hub "
                                                                 "repository (needs a token: `hf auth login`)")
    args = parser.parse_args(argv)
    source, output = Path(args.source), Path(args.output)
    if not source.exists() and source.name != "best":  # best is a pointer file that load_model resolves
        raise UsageError(f"{source}: no such run directory or checkpoint")
    if output.suffix != SUFFIXES[args.format] and args.format != "hub":
        raise UsageError(f"--output {output}: a --format {args.format} file must end in {SUFFIXES[args.format]}")
    if output.exists() or output.is_symlink():
        raise UsageError(f"--output {output} already exists; choose a new path (nothing is overwritten)")
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: its directory {output.parent} does not exist")
    if args.push_to_hub and args.format != "hub":
        raise UsageError(f"--push-to-hub goes with --format hub, not --format {args.format}")
    missing = [name for name in NEEDS[args.format] if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"--format {args.format} needs {', '.join(missing)}: pip install 'vgg-dist[export]'")
    return args


@exits_cleanly_on_stop
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    try:
        with staged(output, folder=args.format == "hub") as temporary:
            if args.format == "hub":
                export_hub(Path(args.source), temporary)
            else:
                export_program(*load_model(Path(args.source)), args.format, temporary)
    except ExportMismatch as mismatch:
        print(f"error: {mismatch}", file=sys.stderr)
        return 1
    print(f"wrote {output}" + (f" (model card: {output / 'README.md'})" if args.format == "hub" else ""))
    if args.push_to_hub:
        push_to_hub(output, args.push_to_hub)
    return 0


if __name__ == "__main__":
    exit_process(main())
