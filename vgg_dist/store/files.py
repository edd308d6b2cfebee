"""File I/O every stored thing shares: writes that a crash cannot leave half done (a temporary file,
flushed, then renamed into place), safetensors files read and written without pickle, permissions that
follow the umask, and a full disk reported in one line instead of a traceback."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vgg_dist.errors import StopRun, UsageError
from vgg_dist.fields import FieldError, from_dict

EXIT_WRITE_FAILED = 74  # EX_IOERR: the disk filled (or failed) while the run wrote; nothing saved is lost


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what `open` gives a new file under this process's umask


class FileError(UsageError):
    """A stored file that must not be used; the message names its path and the problem."""


class WriteFailed(StopRun):
    exit_code = EXIT_WRITE_FAILED


def no_space(error: BaseException) -> bool:
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in str(error)


def write_failed(directory: Path, needed_bytes: int | None, what: str) -> WriteFailed:
    """The one line for a disk that filled while writing `what` into `directory`."""
    free = shutil.disk_usage(directory).free if directory.exists() else 0
    needs = f"{what} needs about {needed_bytes / 2**20:,.1f} MiB and" if needed_bytes else f"writing {what},"
    return WriteFailed(f"no space left on the device holding {directory}: {needs} {free / 2**20:,.1f} MiB are "
                       f"free; free some space (or choose another --output-dir) and rerun with --resume auto; "
                       f"nothing saved was lost")


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(temporary_path)`, flush it to disk, then rename over `path`: readers see the old
    file or the new one, never half of one. The file gets the umask's permissions, whatever `write`
    created it with (safetensors makes 0600 files, which would hide results from a team)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(temporary)
        os.chmod(temporary, FILE_MODE)
        fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if no_space(error):
            raise write_failed(path.parent, None, path.name) from None
        raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable only once its directory is)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text))


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON record per line, on disk before this returns (a log that survives a crash)."""
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:  # a torn last line is what resume expects of a full disk, and drops
        if no_space(error):
            raise write_failed(path.parent, None, path.name) from None
        raise


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file with the umask's permissions. Never an empty metadata dict: safetensors 0.8
    writes an unreadable header for {} with no tensors (plain SGD has no optimizer tensors)."""
    save_file({name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}, path,
              metadata={"vgg_dist.file": Path(path).name, **metadata})
    os.chmod(path, FILE_MODE)


def regular_file_size(path: Path) -> int:
    """The size of a plain file; a link, device, FIFO or directory is refused (reading one could block
    or never end)."""
    mode = path.lstat().st_mode
    if not stat.S_ISREG(mode):
        raise FileError(f"{path}: not a regular file (a link, device or pipe has no place here)")
    return path.lstat().st_size


def read_json(path: Path, limit: int = 64 << 20) -> object:
    """A JSON file, refused in one line (FileError) when missing, not a regular file, over `limit` bytes or
    not JSON."""
    try:
        size = regular_file_size(path)
        if size > limit:
            raise FileError(f"{path}: {size} bytes is too large for this file")
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileError(f"{path}: file not found") from None
    except (OSError, ValueError, RecursionError) as problem:  # RecursionError: nested beyond what json parses
        raise FileError(f"{path}: not readable JSON ({str(problem).splitlines()[0]})") from None


def read_record(path: Path, kind: type):
    """A JSON file as dataclass `kind`, every field checked (vgg_dist.fields); FileError naming the file."""
    try:
        return from_dict(kind, read_json(path))
    except FieldError as error:
        raise FileError(f"{path}: {error}") from None


@contextlib.contextmanager
def _safetensors_file(path: Path):
    try:
        yield
    except FileNotFoundError:
        raise FileError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise FileError(f"{path}: not a valid safetensors file ({str(error).splitlines()[0]})") from None


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """(metadata, {tensor name: (dtype, shape)}) from a safetensors header, loading no tensor data."""
    with _safetensors_file(path):
        regular_file_size(path)
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}, {key: (handle.get_slice(key).get_dtype(),
                                                    list(handle.get_slice(key).get_shape())) for key in handle.keys()}


def check_weights_header(path: Path, shapes: dict[str, list[int]], metadata_key: str, what: str) -> None:
    """A weights file holds exactly the tensor names and shapes `shapes` and the metadata entry
    `metadata_key`: checked from its header, before a byte of tensor data is read."""
    metadata, layout = read_header(path)
    if {name: shape for name, (_, shape) in layout.items()} != shapes or metadata_key not in metadata:
        raise FileError(f"{path}: tensor names or shapes do not match {what}")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    with _safetensors_file(path):
        return load_file(path)
