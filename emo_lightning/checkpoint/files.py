"""Safe files: atomic writes of every artefact, verification of complete checkpoints, a pre-flight of a folder.

* :func:`atomic_save` (``torch.save``) and :func:`atomic_write_text` write to a temporary file in the same
  folder, ``fsync`` it, ``os.replace`` it over the target and ``fsync`` the folder: a reader (or a process killed
  with SIGKILL at any moment) sees either the previous complete file or the new complete one, never a prefix. On
  failure the temporary file is removed and :class:`CheckpointWriteError` names the path and the reason; before
  writing a checkpoint, the free space is compared with its size (the sum of its tensors). Lightning's training
  checkpoints go through them too (``callbacks/safe_checkpoint.py``).
* :func:`atomic_folder` builds an output folder (an export) beside its target and renames it into place: a
  folder is either the previous one or the new one, never a mix; a non-empty target is refused
  (:func:`check_out_folder`, before any work) unless the caller asked to replace it.
* :func:`is_complete_checkpoint` checks a file is a whole ``torch.save`` zip archive (central directory present,
  every member's CRC-32 correct) without unpickling it.
* :func:`preflight_checkpoint_dir` creates the folder, proves it writable with a probe file and compares the
  free space (and ``ulimit -f``) with an estimate of a checkpoint: a run that could never save fails at start-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from emo_lightning.errors import UserError

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
_PROBE_BYTES = 4096


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (nothing partial was left behind)."""


class CheckpointDirError(UserError, OSError):
    """The checkpoint folder cannot hold checkpoints (not creatable, not writable, too little space)."""


class CorruptCheckpointError(UserError, ValueError):
    """A checkpoint file is missing, incomplete (truncated), damaged (bad CRC) or not a checkpoint at all."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's weights do not fit the current model (other shapes or parameter names)."""


# ------------------------------------------------------------------ sizes
def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a nested checkpoint structure (its size on disk, up to small metadata)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def estimate_checkpoint_bytes(module: torch.nn.Module, optimizer_states: int = 2) -> int:
    """Size of a training checkpoint: weights and buffers plus ``optimizer_states`` copies (AdamW: 2), +1 MiB."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return params * (1 + optimizer_states) + buffers + (1 << 20)


def writable_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes a new file in ``directory`` may take: free space, capped by the file-size limit (``ulimit -f``)."""
    free = shutil.disk_usage(directory).free
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return free if soft == resource.RLIM_INFINITY else min(free, soft)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------ atomic writes
def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened / synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Run ``write`` on a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error(err)
        if cause is not None:  # torch.save reports a failed write as RuntimeError, the OSError as its context
            raise CheckpointWriteError(
                f"cannot write {path}: {cause.strerror or cause}; the partial file was removed, "
                "the previous file is unchanged"
            ) from err
        raise
    _fsync_dir(directory)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    Raises:
        CheckpointWriteError: not enough space for the checkpoint (checked first), or the write failed; the
            temporary file is removed and an existing file at ``path`` is unchanged.
    """
    path = Path(path)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        need, room = tensor_bytes(obj), writable_bytes(directory)
    except OSError as err:
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {err}") from err
    if need > room:
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: it needs about {_mb(need)} but only {_mb(room)} can be written "
            f"there (free space / file-size limit); nothing was written, the previous checkpoint is unchanged"
        )
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_lines(path: str | os.PathLike[str], lines: Iterable[str]) -> None:
    """Write ``lines`` (UTF-8, streamed) to ``path`` atomically (a JSON result, a subset, routes, a report)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointWriteError(f"cannot write {path}: {err}") from err

    def write(f: IO[bytes]) -> None:
        for line in lines:
            f.write(line.encode("utf-8"))

    _atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_lines(path, [text])


def check_out_folder(out: str | os.PathLike[str], overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an existing non-empty output folder (or a file in its place) unless ``overwrite``: a user error
    before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a folder", "pass a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"{flag} {out}: the folder is not empty", "pass a new folder, or --overwrite to replace it whole"
        )
    return out


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out``; when the block succeeds it replaces ``out`` whole (the
    previous folder is renamed away, then deleted). On failure it is removed and ``out`` stays as it was."""
    out = check_out_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TMP_SUFFIX, dir=out.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=TMP_SUFFIX, dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _os_error(err: BaseException | None) -> OSError | None:
    """The first ``OSError`` in an exception's context chain (``None`` if there is none)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files left by writers that were killed (``.<name>.ckpt.*.tmp``); return them."""
    removed = []
    folder = Path(directory)
    if folder.is_dir():
        for tmp in folder.glob(f".*.ckpt.*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


# ------------------------------------------------------------------ verification
def is_complete_checkpoint(path: str | os.PathLike[str], check_crc: bool = True) -> bool:
    """Whether ``path`` is a whole ``torch.save`` archive (a folder, e.g. DeepSpeed's, counts as complete).

    ``check_crc`` reads the whole file and checks every member's CRC-32 (catches bit flips, not only
    truncation).
    """
    path = Path(path)
    if path.is_dir():
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
                return False
            return archive.testzip() is None if check_crc else True
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def newest_complete(paths: Iterable[str | os.PathLike[str]]) -> str | None:
    """The most recently modified complete checkpoint among ``paths`` (warning about each broken one)."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    for path in sorted(existing, key=lambda p: p.stat().st_mtime, reverse=True):
        if is_complete_checkpoint(path):
            return str(path)
        log.warning("checkpoint %s is incomplete or corrupt: skipped, trying an older one", path)
    return None


# ------------------------------------------------------------------ pre-flight
def preflight_checkpoint_dir(
    directory: str | os.PathLike[str], estimate_bytes: int = 0, copies: int = 2
) -> None:
    """Fail early unless ``directory`` can receive ``copies`` checkpoints of ``estimate_bytes`` each.

    Creates the folder, writes, fsyncs and deletes a probe file, then compares the writable bytes (free space,
    ``ulimit -f``) with the estimate (``copies``: e.g. ``last.ckpt`` and ``stepN.ckpt`` written at one step).

    Raises:
        CheckpointDirError: with the folder and the reason.
    """
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointDirError(f"checkpoint directory {folder} cannot be created: {err}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TMP_SUFFIX, dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * _PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(probe)
    except OSError as err:
        raise CheckpointDirError(f"checkpoint directory {folder} is not writable: {err}") from None
    if estimate_bytes:
        room = writable_bytes(folder)
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY and soft < estimate_bytes:
            raise CheckpointDirError(
                f"checkpoint directory {folder}: the file-size limit (ulimit -f) is {_mb(soft)}, "
                f"a checkpoint needs about {_mb(estimate_bytes)}"
            )
        if room < copies * estimate_bytes:
            raise CheckpointDirError(
                f"checkpoint directory {folder}: only {_mb(room)} free, {copies} checkpoints need about "
                f"{_mb(copies * estimate_bytes)} ({_mb(estimate_bytes)} each)"
            )
