"""Crash-safe checkpoint files: a save either completes or leaves the previous file as it was.

:func:`save_checkpoint` writes to a temporary file in the target's directory, flushes it and
calls ``os.fsync`` on it, renames it over the target with ``os.replace`` (atomic on POSIX and
Windows when both lie on one file system, which the same directory guarantees), then syncs the
directory so that the rename itself survives a power cut. A process killed at any point before
the rename leaves the old checkpoint untouched, plus at worst a stray ``.<name>.<pid>.<hex>.tmp``
file beside it (delete it at leisure; later saves ignore it); one killed after the rename has the
new checkpoint. Readers never see a half-written file.

Example::

    save_checkpoint({"pruner": pruner.state_dict(),
                     "sampler": sampler.state_dict(consumed=trained),
                     "model": model.state_dict(), "optimizer": opt.state_dict()}, "run/ckpt.pt")
    ...
    state = load_checkpoint("run/ckpt.pt", map_location="cpu")
    pruner.load_state_dict(state["pruner"])
    sampler.load_state_dict(state["sampler"])
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint"]

PathLike = str | os.PathLike


def _check_path(path) -> str:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if not path:
        raise ValueError("path must not be empty")
    return path


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:   # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:   # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def save_checkpoint(obj: Any, path: PathLike) -> None:
    """Write ``obj`` with ``torch.save`` to ``path`` atomically and durably.

    Args:
        obj: anything ``torch.save`` accepts (typically a dict of state dicts).
        path: the checkpoint file. Its directory must exist; an existing file is replaced only once
            the new one is completely on disk.

    Raises:
        TypeError: ``path`` is not a str or path-like.
        ValueError: ``path`` is empty or names a directory.
        FileNotFoundError: the directory does not exist.
        Whatever ``torch.save`` raises for an object it cannot serialise; the old file is kept and
        the temporary file removed.
    """
    path = _check_path(path)
    if os.path.isdir(path):
        raise ValueError(f"path must be a file, got the directory {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"the directory of path={path!r} does not exist")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}."
                                  f"{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask set the permissions, as a plain open() would
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def load_checkpoint(path: PathLike, map_location: Any = None, *, weights_only: bool = True) -> Any:
    """Read a checkpoint written by :func:`save_checkpoint` (or by ``torch.save``).

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``, e.g. ``"cpu"`` or a device. Default ``None`` puts
            tensors back where they were saved.
        weights_only: passed to ``torch.load``. Default ``True``: only tensors and plain
            containers are unpickled, which is all gpuprune's state dicts hold, and a file from an
            untrusted source cannot run code.

    Raises:
        TypeError: ``path`` is not a str or path-like.
        FileNotFoundError: there is no file at ``path``.
        ValueError: the file is truncated or not a checkpoint (the cause is chained).
    """
    path = _check_path(path)
    if isinstance(map_location, (str, torch.device)):
        try:
            torch.device(map_location)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"map_location must name a device, got map_location="
                             f"{map_location!r}") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at path={path!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path!r} is truncated or not a torch checkpoint: {e}") from e
    except Exception as e:  # pickle.UnpicklingError and friends for a file that is not a checkpoint
        if type(e).__module__ in ("pickle", "_pickle"):
            raise ValueError(f"checkpoint {path!r} cannot be unpickled: {e}") from e
        raise
