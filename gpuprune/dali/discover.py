"""Which files ``fn.readers.file(file_root=...)`` reads, and their labels, in its order.

:class:`~gpuprune.dali.FileSource` ``(file_root=...)`` uses this to stand in for the reader: the same
files with the same labels, so a converted script trains on the same data.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Sequence

import numpy as np

from .._checks import check_bool

__all__ = ["discover_files", "READER_FILE_FILTERS"]

#: ``fn.readers.file``'s default ``file_filters`` (DALI 2.4), matched case-insensitively by default
READER_FILE_FILTERS = ("*.jpg", "*.jpeg", "*.png", "*.bmp", "*.tif", "*.tiff", "*.pnm", "*.ppm",
                       "*.pgm", "*.pbm", "*.jp2", "*.webp", "*.flac", "*.ogg", "*.wav")


def _globs(name: str, value) -> list[str]:
    """A str or a sequence of str as a list, or TypeError naming ``name``."""
    if isinstance(value, str):
        return [value]
    try:
        globs = list(value)
    except TypeError:
        globs = None
    if globs is None or not all(isinstance(g, str) for g in globs):
        raise TypeError(f"{name} must be a str or a list of str, got {type(value).__name__} "
                        f"{value!r}")
    return globs


def discover_files(file_root: str | os.PathLike, *,
                   file_filters: Sequence[str] | str = READER_FILE_FILTERS,
                   case_sensitive_filter: bool = False,
                   dir_filters: Sequence[str] | str | None = None) -> tuple[list[str], np.ndarray]:
    """The files and labels ``fn.readers.file(file_root=...)`` reads, in its order.

    DALI 2.4's rule: every subdirectory of ``file_root`` (one level; following symlinks; those
    matching ``dir_filters`` if given) is a class, labelled ``0, 1, ...`` in byte-wise sorted name
    order; its regular files and symlinks whose names match one of ``file_filters`` (``fnmatch``
    globs, case-insensitive unless ``case_sensitive_filter``) are its samples, in byte-wise sorted
    order. Files directly in ``file_root`` are not used.

    Returns:
        ``(paths, labels)``: the paths (``file_root`` joined with the class and file name) and an
        int32 array of labels.
    """
    root = os.fspath(file_root)
    file_filters = _globs("file_filters", file_filters)
    if dir_filters is not None:
        dir_filters = _globs("dir_filters", dir_filters)
    case_sensitive_filter = check_bool("case_sensitive_filter", case_sensitive_filter)

    def matches(name: str, globs) -> bool:
        if case_sensitive_filter:
            return any(fnmatch.fnmatchcase(name, g) for g in globs)
        return any(fnmatch.fnmatchcase(name.lower(), g.lower()) for g in globs)

    if not os.path.isdir(root):
        raise ValueError(f"file_root={root!r} is not a directory")
    with os.scandir(root) as entries:
        classes = sorted((e.name for e in entries if e.is_dir()
                          and (not dir_filters or matches(e.name, dir_filters))), key=os.fsencode)
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        with os.scandir(folder) as entries:
            names = sorted((e.name for e in entries
                            if (e.is_symlink() or e.is_file(follow_symlinks=False))
                            and matches(e.name, file_filters)), key=os.fsencode)
        paths += [os.path.join(folder, name) for name in names]
        labels += [label] * len(names)
    if not paths:
        raise ValueError(f"no files matching {list(file_filters)} in the subdirectories of "
                         f"file_root={root!r}")
    return paths, np.asarray(labels, np.int32)
