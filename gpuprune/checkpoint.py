"""Crash-safe, checksummed checkpoint files.

:func:`save_checkpoint` serialises with ``torch.save`` into a temporary file beside the target,
prefixed by a 56-byte header holding the sha256 of the payload; it fsyncs the file, renames it over
the target with ``os.replace`` (atomic on POSIX and Windows within one file system) and syncs the
directory so the rename survives a power cut. A process killed at any point before the rename leaves
the previous checkpoint untouched (plus at worst a stray temporary file, removed by the next save of
the same target); a reader never sees a half-written file. :func:`load_checkpoint` verifies the
checksum, so a flipped byte is an error naming the file, never changed statistics.

What a save refuses or keeps:

* a target that exists but is not a regular file (a directory, device, FIFO, socket) is refused, and
  so is a path that can only name a directory (``"ck/"``), whether or not it exists;
* several threads of one process may save to the same path at once (an asynchronous checkpoint
  thread beside the training loop): each writes its own temporary file, and the last rename wins;
* a symlink is written through: its target is replaced atomically, the link stays a link;
* an existing file keeps its permission bits (and, where allowed, its owner);
* a full disk, a file-size limit or another write error is an ``OSError`` naming the path and the
  cause; ``KeyboardInterrupt`` arrives as itself; either way the old file is intact and the
  temporary file removed.

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

import errno
import hashlib
import io
import os
import re
import secrets
import stat
import threading
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]

PathLike = str | os.PathLike

_MAGIC = b"GPUPRUNE-CKPT\x00v1"          # 16 bytes
_HEADER = len(_MAGIC) + 32 + 8            # magic, sha256 of the payload, payload length
_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "the file is too large "
           "(file-size limit)", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, or not a checkpoint (the message names the file)."""


#: temporary files being written by this process, by any thread: the stale-file clean-up of one
#: thread's save must not remove another thread's live file (they carry the same process id)
_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()


def _check_path(path) -> str:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if not path:
        raise ValueError("path must not be empty")
    return path


def _names_a_directory(path: str) -> bool:
    """Whether ``path`` can only name a directory: it ends with a separator, or in ``.``/``..``."""
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    return path.endswith(seps) or os.path.basename(path) in (".", "..")


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


def _temp_prefix(target: str) -> str:
    """Temporary files of one target are ``.gpuprune-<hash of its name>.<pid>.<hex>.tmp``: short
    whatever the name's length, and recognisable for clean-up."""
    digest = hashlib.sha256(os.path.basename(target).encode()).hexdigest()[:16]
    return f".gpuprune-{digest}."


def _remove_stale_temps(directory: str, prefix: str) -> None:
    """Delete temporary files of this target left by processes that no longer run (SIGKILL)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.[0-9a-f]{8}\.tmp")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group(1))
        with _LIVE_LOCK:
            if os.path.join(directory, name) in _LIVE:
                continue                      # another thread of this process is saving it
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue                      # a live process is saving: leave its file alone
            except ProcessLookupError:
                pass
            except OSError:                   # exists but not ours to signal: leave it
                continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


class _HashingWriter:
    """A write-only file object that hashes what passes through and remembers the first error."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0
        #: the first error raised inside a write: torch.save replaces it with its own
        #: "[enforce fail at inline_container.cc] unexpected pos" RuntimeError on the way out
        self.error: BaseException | None = None

    def write(self, data) -> int:
        try:
            view = memoryview(data).cast("B")
            self.sha.update(view)
            self.size += len(view)
            return self.f.write(view)
        except BaseException as e:
            if self.error is None:
                self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_error(path: str, err: OSError) -> OSError:
    cause = _CAUSES.get(err.errno, err.strerror or str(err))
    return OSError(err.errno, f"cannot save checkpoint {path!r}: {cause}")


def save_checkpoint(obj: Any, path: PathLike) -> None:
    """Write ``obj`` with ``torch.save`` to ``path`` atomically, durably and checksummed.

    Args:
        obj: anything ``torch.save`` accepts (typically a dict of state dicts).
        path: the checkpoint file. Its directory must exist; an existing file (or a symlink's
            target) is replaced only once the new one is completely on disk.

    Raises:
        TypeError: ``path`` is not a str or path-like.
        ValueError: ``path`` is empty, names something that is not a regular file, or can only
            name a directory (it ends with a separator, or in ``.`` or ``..``).
        FileNotFoundError: the directory does not exist.
        OSError: the file cannot be written (the message names the path and the cause).
        Whatever ``torch.save`` raises for an object it cannot serialise. In every case the old
        file is kept and the temporary file removed.
    """
    path = _check_path(path)
    if _names_a_directory(path):
        # "ck/" would otherwise save to a file "ck" beside it: refuse whether or not it exists
        raise ValueError(f"path={path!r} names a directory; a checkpoint is saved to a file, e.g. "
                         f"{os.path.join(path, 'checkpoint.pt')!r}")
    target = os.path.realpath(path)          # write through symlinks, atomically at the target
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ValueError(f"path={path!r} is {kind}; a checkpoint is saved to a regular file")
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save checkpoint {path!r}: its directory "
                                f"{os.path.dirname(os.path.abspath(path))!r} does not exist")
    prefix = _temp_prefix(target)
    _remove_stale_temps(directory, prefix)
    tmp = os.path.join(directory, f"{prefix}{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with _LIVE_LOCK:
        _LIVE.add(tmp)
    try:
        _write(obj, path, tmp, target, st)
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(tmp)
    _fsync_dir(directory)


def _write(obj: Any, path: str, tmp: str, target: str, st: os.stat_result | None) -> None:
    """Write ``obj`` into the new file ``tmp`` and rename it over ``target``; on any failure remove
    ``tmp`` and raise (an ``OSError`` naming ``path`` for a write error)."""
    try:
        # 0o666 lets the umask set a new file's permissions, as a plain open() would
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise _write_error(path, e) from e
    w = None
    try:
        if st is not None:
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            try:
                os.fchown(fd, st.st_uid, st.st_gid)
            except OSError:                  # not permitted (not root): keep our ownership
                pass
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(_HEADER))
            w = _HashingWriter(f)
            torch.save(obj, w)
            f.seek(0)
            f.write(_MAGIC + w.sha.digest() + w.size.to_bytes(8, "little"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = w.error if w is not None and w.error is not None else e
        if isinstance(cause, OSError):
            raise _write_error(path, cause) from cause
        if cause is not e:
            raise cause from None
        raise


class _Window(io.RawIOBase):
    """The part of a file after the header, as a seekable file of its own (for torch.load)."""

    def __init__(self, f, offset: int) -> None:
        self.f, self.offset = f, offset
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = self.offset if whence == io.SEEK_SET else 0
        return self.f.seek(pos + base, whence) - self.offset

    def tell(self) -> int:
        return self.f.tell() - self.offset

    def readinto(self, b) -> int:
        return self.f.readinto(b)


def load_checkpoint(path: PathLike, map_location: Any = None, *, weights_only: bool = True) -> Any:
    """Read a checkpoint written by :func:`save_checkpoint` (or a plain ``torch.save`` file).

    A gpuprune checkpoint's checksum is verified before anything is unpickled; a plain
    ``torch.save`` file has none to verify and is read as torch reads it.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``, e.g. ``"cpu"`` or a device. Default ``None`` puts
            tensors back where they were saved.
        weights_only: passed to ``torch.load``. Default ``True``: only tensors and plain containers
            are unpickled, which is all gpuprune's state dicts hold, and a file from an untrusted
            source cannot run code.

    Raises:
        TypeError: ``path`` is not a str or path-like.
        FileNotFoundError: there is no file at ``path``.
        CheckpointError (a ValueError): the file is corrupt (checksum mismatch), truncated or not a
            checkpoint; the message names the file.
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
    with open(path, "rb") as f:
        head = f.read(_HEADER)
        if head[:len(_MAGIC)] == _MAGIC:
            if len(head) < _HEADER:
                raise CheckpointError(f"checkpoint {path!r} is truncated (incomplete header)")
            digest, size = head[len(_MAGIC):len(_MAGIC) + 32], int.from_bytes(head[-8:], "little")
            sha, got = hashlib.sha256(), 0
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
                got += len(chunk)
            if got != size:
                raise CheckpointError(f"checkpoint {path!r} is truncated or extended: its header "
                                      f"announces {size} bytes of data, the file holds {got}")
            if sha.digest() != digest:
                raise CheckpointError(f"checkpoint {path!r} is corrupt: the sha256 of its content "
                                      f"does not match the one saved with it")
            source: Any = _Window(f, _HEADER)
        else:
            f.seek(0)
            source = f
        try:
            return torch.load(source, map_location=map_location, weights_only=weights_only)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a file that is not one
            if isinstance(e, OSError):
                raise
            kind = "cannot be unpickled" if "pickle" in type(e).__module__ else "is not a checkpoint"
            raise CheckpointError(f"checkpoint {path!r} {kind} (neither a gpuprune checkpoint nor "
                                  f"a torch.save file): {type(e).__name__}: {e}") from e
