"""One file per sample: the source emits paths, DALI reads (``fn.io.file.read``) and decodes them.

:class:`FileSource` also checks files before DALI sees them (``verify``) and skips bad ones
(``on_error="skip"``), with the same decoder on the same device as the pipeline, so a file the
pipeline cannot decode is the one the check rejects. ``FileSource(file_root=...)`` lists an image
folder as ``fn.readers.file`` does (:func:`~gpuprune.dali.discover_files`).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from .._checks import check_bool, check_choice
from ._shared import SharedArray
from .discover import READER_FILE_FILTERS, discover_files
from .sources import BadSampleError, PlanSource, host_array, is_gpu_array, layouts_of

__all__ = ["FileSource"]

# sample status (uint8, shared with workers)
_UNKNOWN, _GOOD, _UNREADABLE, _UNDECODABLE = 0, 1, 2, 3
_REASONS = {_UNREADABLE: "unreadable", _UNDECODABLE: "undecodable"}


def _file_signature(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


class FileSource(PlanSource):
    """One file per sample: emits paths, DALI reads (``fn.io.file.read``) and decodes them.

    The graph gets ``(images, *arrays)``: the decoded images (or the raw bytes with
    ``decoder=None``), then one node per extra array, e.g. ``FileSource(paths, labels)`` gives
    ``(images, labels)`` to ``define_graph``. ``FileSource(file_root=root)`` finds the files and
    their labels as ``fn.readers.file(file_root=root)`` does (:func:`discover_files`) and gives the
    same ``(images, labels)``.

    Labels look like ``fn.readers.file``'s: a 1-D integer array (one integer per sample) is emitted
    as int32 samples of shape ``(1,)``, so a batch of labels has shape ``(B, 1)`` as with the reader
    and existing ``label.squeeze(-1)`` code keeps working. ``reader_labels=False`` emits such arrays
    unchanged (e.g. int64 of shape ``(B,)``).

    Args:
        files: one path per sample (str or path-like), in sample-id order. Not with ``file_root``.
        *arrays: per-sample host arrays with first dimension N (labels, ...). Not with
            ``file_root``, which makes the labels.
        file_root: a folder with one subdirectory per class, read like ``fn.readers.file``.
        file_filters, case_sensitive_filter, dir_filters: as for ``fn.readers.file`` (with
            ``file_root`` only).
        reader_labels: emit 1-D integer arrays as the reader emits labels (see above). Default True.
        decoder: ``"image"`` (``fn.decoders.image``, default), ``"numpy"`` (``fn.decoders.numpy``,
            CPU) or None (raw bytes, as ``fn.readers.file`` gives them; decode in ``define_graph``,
            e.g. with ``fn.decoders.image_random_crop``).
        output_type: colour space of decoded images. Default ``types.RGB``.
        decoder_device: ``"mixed"`` (GPU decoding) or ``"cpu"``. Default: ``"mixed"`` when the
            pipeline has a ``device_id``, else ``"cpu"``.
        decoder_kwargs: extra arguments for the decoder (e.g. ``{"hw_decoder_load": 0.65}``).
        read_kwargs: extra arguments for ``fn.io.file.read``. Default ``{"dont_use_mmap": True}``
            (plain reads): mapping each file costs ``fn.io.file.read`` a map and an unmap per
            sample, which made it about half as fast on small files in our measurements
            (docs/dali.md, Cost); pass ``{"dont_use_mmap": False}`` for DALI's default.
        layouts: DALI layout per extra array, or None.
        on_error: what to do with a file that cannot be read or decoded.

            * ``"raise"`` (default): the iterator raises :class:`BadSampleError` naming the file, the
              sample id and the epoch. Without ``verify``, nothing is checked up front: after a
              pipeline error the iterator re-reads and re-decodes (with the pipeline's decoder on
              its device) the samples of the batches in flight to find the culprit, and re-raises
              DALI's own error if none is bad.
            * ``"skip"``: a bad sample is dropped **from its batch**, in every epoch: that batch is
              shorter; batch boundaries, ``len()`` and resume points are unchanged, and the sample
              is recorded in :attr:`bad_samples`. A batch whose every sample is bad cannot be
              delivered (DALI rejects empty batches) and raises :class:`BadSampleError`. Skipped
              samples are never observed, so a loss-based policy may keep planning them. Needs
              ``verify``.
        verify: check each planned sample before DALI sees it. The first time, and whenever its
            file changed since (size, modification time or inode, from one ``os.stat`` per sample
            and epoch), the file is read and decoded with the pipeline's decoder on the pipeline's
            decoding device (DALI's eager mode: ``"mixed"`` decodes with nvJPEG on the GPU, so a
            file nvJPEG rejects is rejected here too); otherwise the cached verdict (in shared
            memory) is reused. So a file deleted, truncated or rewritten
            between epochs is caught in the epoch it is next planned. Default: True for
            ``on_error="skip"``, False for ``"raise"``. Use it with ``"raise"`` too when the data
            may hold undecodable images and the pipeline decodes on the CPU: DALI 2.4's CPU image
            decoder was seen to crash the process (SIGSEGV in ``ImageDecoder<CPUBackend>``) right
            after reporting a decoding error, before the iterator can name the file. A file that
            changes while DALI reads it, or that is altered without changing its size, time or
            inode, still reaches DALI; the iterator then names it in a :class:`BadSampleError`.
        parallel, prefetch_queue_depth: see :class:`PlanSource`. With ``verify`` the checks run in
            the workers, which cannot use the GPU: ``verify`` with ``"mixed"`` decoding needs
            ``parallel=False`` (the pipeline definition raises otherwise).
    """

    def __init__(self, files: Sequence | None = None, *arrays,
                 file_root: str | os.PathLike | None = None,
                 file_filters: Sequence[str] | str = READER_FILE_FILTERS,
                 case_sensitive_filter: bool = False, dir_filters: Sequence[str] | str | None = None,
                 reader_labels: bool = True, decoder: str | None = "image",
                 output_type=types.RGB, decoder_device: str | None = None,
                 decoder_kwargs: dict | None = None,
                 layouts: Sequence[str | None] | str | None = None, on_error: str = "raise",
                 verify: bool | None = None, read_kwargs: dict | None = None,
                 parallel: bool = False, prefetch_queue_depth: int = 2) -> None:
        if file_root is not None:
            if files is not None or arrays:
                raise ValueError("give files (and arrays) or file_root, not both: file_root finds "
                                 "the files and makes the labels")
            files, labels = discover_files(file_root, file_filters=file_filters,
                                           case_sensitive_filter=case_sensitive_filter,
                                           dir_filters=dir_filters)
            arrays = (labels,)
        elif files is None:
            raise TypeError("FileSource needs files (a sequence of paths) or file_root")
        if isinstance(files, (str, bytes, os.PathLike)):
            raise TypeError("files must be a sequence of paths, got a single path")
        files = [os.fspath(f) if isinstance(f, os.PathLike) else f for f in files]
        if not files:
            raise ValueError("files must not be empty")
        wrong = [f for f in files if not isinstance(f, str)]     # (None is an entry too)
        if wrong:
            raise TypeError(f"files must hold str paths, got {type(wrong[0]).__name__} "
                            f"{wrong[0]!r}")
        super().__init__(len(files), parallel=parallel, prefetch_queue_depth=prefetch_queue_depth)
        check_choice("decoder", decoder, ("image", "numpy", None))
        check_choice("on_error", on_error, ("raise", "skip"))
        self.reader_labels = check_bool("reader_labels", reader_labels)
        if verify is None:
            verify = on_error == "skip"
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be a bool or None, got {verify!r}")
        if on_error == "skip" and not verify:
            raise ValueError("on_error='skip' needs verify=True: a bad file must be caught before "
                             "DALI reads it")
        if decoder_device is not None:
            check_choice("decoder_device", decoder_device, ("cpu", "mixed"))
            if decoder == "numpy" and decoder_device != "cpu":
                raise ValueError("decoder='numpy' runs on the CPU only (decoder_device='cpu')")
        if decoder_kwargs is not None and not isinstance(decoder_kwargs, dict):
            raise TypeError(f"decoder_kwargs must be a dict, got {type(decoder_kwargs).__name__}")
        if read_kwargs is not None and not isinstance(read_kwargs, dict):
            raise TypeError(f"read_kwargs must be a dict, got {type(read_kwargs).__name__}")
        self.read_kwargs = {"dont_use_mmap": True, **(read_kwargs or {})}
        self.files = files
        encoded = [os.fsencode(f) for f in files]
        self._offsets = np.zeros(len(files) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        # one buffer (cheap to pickle), a NUL at its end so an empty batch of paths still indexes it
        self._path_bytes = np.frombuffer(b"".join(encoded) + b"\0", np.uint8)
        if any(is_gpu_array(a) for a in arrays):
            raise ValueError("FileSource arrays must be host arrays (numpy)")
        self._arrays = []
        for i, a in enumerate(arrays):
            a = host_array(f"arrays[{i}]", a)
            if a.shape[0] != len(files):
                raise ValueError(f"arrays[{i}] has {a.shape[0]} entries for {len(files)} files")
            if self.reader_labels and a.ndim == 1 and a.dtype.kind in "iub":
                if a.size and (a.min() < -2**31 or a.max() >= 2**31):
                    raise ValueError(f"arrays[{i}] holds values outside int32, which labels like "
                                     f"fn.readers.file's cannot carry; pass reader_labels=False")
                a = a.astype(np.int32).reshape(-1, 1)    # the reader's (1,)-shaped int32 labels
            self._arrays.append(a)
        self.layouts = layouts_of(layouts, len(arrays))
        self.decoder = decoder
        self.output_type = output_type
        self.decoder_device = decoder_device
        self.decoder_kwargs = dict(decoder_kwargs or {})
        self.on_error = on_error
        self.verify = verify
        self._status: SharedArray | None = None
        self._signature: SharedArray | None = None
        self._check_device = "cpu"          # where verify decodes: the pipeline's decoding device

    # ------------------------------------------------------------------ graph side
    def outputs(self) -> tuple:
        pipe = Pipeline.current()
        dtypes = [types.UINT8] + [types.to_dali_type(a.dtype) for a in self._arrays]
        ndims = [1] + [a.ndim - 1 for a in self._arrays]
        paths, *rest = self.external_source(dtype=dtypes, ndim=ndims, layout=[None] + self.layouts)
        data = fn.io.file.read(paths, **self.read_kwargs)
        if self.decoder == "image":
            device = self.decoder_device or ("mixed" if pipe.device_id is not None else "cpu")
            if device == "mixed":
                if self.verify and self.parallel:
                    raise ValueError("verify with decoder_device='mixed' checks each file with the "
                                     "GPU decoder, which DALI's parallel workers cannot use: pass "
                                     "parallel=False (the checks then run in this process)")
                self._check_device = ("gpu" if pipe.device_id is None
                                      else f"gpu:{pipe.device_id}")
            data = fn.decoders.image(data, device=device, output_type=self.output_type,
                                     **self.decoder_kwargs)
        elif self.decoder == "numpy":
            data = fn.decoders.numpy(data, **self.decoder_kwargs)
        return (data, *rest)

    def _allocate(self) -> None:
        super()._allocate()
        if self.verify:                     # each sample's verdict, and the file it was made for
            self._status = SharedArray((self.num_samples,), np.uint8, fill=_UNKNOWN)
            self._signature = SharedArray((self.num_samples, 3), np.int64, fill=-1)

    def _paths(self, ids: np.ndarray) -> np.ndarray:
        """The batch's paths as one uint8 matrix, row r = path of ``ids[r]`` padded with NUL bytes
        (at least one). One dense array is fed to DALI in one copy, where a list of per-sample
        arrays costs DALI a Python-level step per sample (about a quarter of the reading
        throughput); ``fn.io.file.read`` opens the path up to its first NUL, as every POSIX call
        does (a path cannot contain NUL)."""
        lo, hi = self._offsets[ids], self._offsets[ids + 1]
        lengths = hi - lo
        width = int(lengths.max(initial=0)) + 1
        cols = np.arange(width, dtype=np.int64)
        inside = cols < lengths[:, None]
        pos = np.where(inside, lo[:, None] + cols, 0)
        return np.where(inside, self._path_bytes[pos], np.uint8(0))

    def _serve(self, ids: np.ndarray, epoch: int) -> tuple:
        if self.verify:
            good = self._check_batch(ids, epoch)
            if self.on_error == "skip":
                ids = ids[good]
        return super()._serve(ids, epoch)

    def gather(self, ids: np.ndarray, epoch: int) -> tuple:
        return (self._paths(ids), *(a[ids] for a in self._arrays))

    # ------------------------------------------------------------------ checks
    def _probe(self, i: int) -> tuple[tuple[int, str] | None, tuple[int, int, int] | None]:
        """``(verdict, signature of the file that was checked)``."""
        try:
            with open(self.files[i], "rb") as f:
                sig = _file_signature(os.fstat(f.fileno()))
                raw = f.read()
        except OSError as e:
            return (_UNREADABLE, str(e)), None
        if self.decoder is None:
            return None, sig
        if not raw:
            return (_UNDECODABLE, "the file is empty"), sig
        try:
            import nvidia.dali.experimental.dynamic as ndd   # eager DALI, the pipeline's decoders
            with ndd.EvalMode.sync_full:                     # errors surface here, GPU ones too
                buf = ndd.as_tensor(np.frombuffer(raw, np.uint8))
                if self.decoder == "image":
                    ndd.decoders.image(buf, device=self._check_device,
                                       output_type=self.output_type, **self.decoder_kwargs)
                else:
                    ndd.decoders.numpy(buf, **self.decoder_kwargs)
        except Exception as e:    # any decoder failure marks the sample bad
            return (_UNDECODABLE, str(e)), sig
        return None, sig

    def _check_batch(self, ids: np.ndarray, epoch: int) -> np.ndarray:
        """Which samples of a batch load (bool mask); raise in ``on_error="raise"`` mode.

        A cached verdict is reused while the file's signature (size, mtime, inode) is unchanged.
        """
        status, signature = self._status.array, self._signature.array
        for i in ids:
            try:
                sig = _file_signature(os.stat(self.files[i]))
            except OSError:
                sig = None
            if sig is not None and status[i] != _UNKNOWN and tuple(signature[i]) == sig:
                continue
            if sig is None and status[i] == _UNREADABLE:
                continue
            verdict, sig = self._probe(int(i))
            signature[i] = sig if sig is not None else (-1, -1, -1)
            status[i] = _GOOD if verdict is None else verdict[0]
            if verdict is not None and self.on_error == "raise":
                what = "read" if verdict[0] == _UNREADABLE else "decode"
                raise BadSampleError(f"cannot {what} file {self.files[i]!r} (sample index {i}, epoch "
                                     f"{epoch}): {verdict[1]}", index=int(i), path=self.files[i])
        good = status[ids] == _GOOD
        if self.on_error == "raise" and not good.all():   # found bad in an earlier epoch
            i = int(ids[~good][0])
            raise BadSampleError(f"file {self.files[i]!r} (sample index {i}, epoch {epoch}) is "
                                 f"{_REASONS[int(status[i])]}", index=i, path=self.files[i])
        if not good.any():
            i = int(ids[0])
            raise BadSampleError(
                f"every sample of a batch is bad (sample ids {ids.tolist()}, e.g. {self.files[i]!r}, "
                f"epoch {epoch}); on_error='skip' drops bad samples from their batch but DALI cannot "
                "take an empty batch", index=i, path=self.files[i])
        return good

    def kept(self, lo: int, hi: int) -> np.ndarray | None:
        # the verdicts the batch was served with: a share holds each id once (FILL's padding
        # repeats the last id within the last batch), so no later check changed them
        if self.on_error != "skip":
            return None
        mask = self._status.array[self._ids.array[lo:hi]] == _GOOD
        return None if mask.all() else mask

    def find_bad(self, first: int, last: int) -> tuple[int, str, str, str] | None:
        ids = self._ids.array[max(0, first):min(last, len(self._ids.array))]
        seen: set[int] = set()
        for i in ids.tolist():
            if i in seen:
                continue
            seen.add(i)
            verdict, sig = self._probe(i)
            if verdict is not None:
                if self._status is not None:          # remember it: skip mode skips it from now on
                    self._status.array[i] = verdict[0]
                    self._signature.array[i] = sig if sig is not None else (-1, -1, -1)
                what = "read" if verdict[0] == _UNREADABLE else "decode"
                return i, self.files[i], what, verdict[1]
        return None

    @property
    def bad_samples(self) -> dict[int, tuple[str, str]]:
        if self._status is None:
            return {}
        bad = np.flatnonzero(self._status.array >= _UNREADABLE)
        return {int(i): (self.files[i], _REASONS[int(self._status.array[i])]) for i in bad}
