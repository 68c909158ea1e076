"""Argument checks shared by the public entry points.

Every check raises before any state is touched, and names the argument and the value it got.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "check_int",
    "check_float",
    "int_bound",
    "float_bound",
    "check_choice",
    "check_bool",
    "check_batch",
    "check_id_range",
    "resolve_device",
    "flatten_config",
    "config_differences",
    "MISSING",
]


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as an int, or raise TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    bound = int_bound(value, minimum, maximum)
    if bound:
        raise ValueError(f"{name} must be {bound}, got {name}={value}")
    return value


def int_bound(value: int, minimum: int | None = None, maximum: int | None = None) -> str | None:
    """The bound an int breaks (``">= 1"``), or None: the one range rule of :func:`check_int`,
    also used by the command line (which words its messages without a keyword name)."""
    if minimum is not None and value < minimum:
        return f">= {minimum}"
    if maximum is not None and value > maximum:
        return f"<= {maximum}"
    return None


def check_float(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float inside the given interval, or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    bound = float_bound(value, low, high, low_open, high_open)
    if bound:
        raise ValueError(f"{name} must be {bound}, got {name}={value}")
    return value


def float_bound(value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> str | None:
    """The condition a float breaks (``"finite"``, ``"> 0.0"``, ``"<= 1.0"``), or None: the one
    interval rule of :func:`check_float`, also used by the command line."""
    if not math.isfinite(value):
        return "finite"
    if low is not None and (value < low or (low_open and value == low)):
        return f"{'>' if low_open else '>='} {low}"
    if high is not None and (value > high or (high_open and value == high)):
        return f"{'<' if high_open else '<='} {high}"
    return None


def check_bool(name: str, value) -> bool:
    """Return ``value`` as a bool (a Python or NumPy bool), or raise TypeError naming ``name``.

    Strings such as ``"no"`` are truthy in Python, so they are refused rather than guessed at.
    """
    if type(value).__name__ not in ("bool", "bool_"):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_choice(name: str, value, choices) -> str:
    """Return ``value`` if it is one of ``choices``, or raise naming ``name``.

    TypeError when every choice is a string and ``value`` is not one (e.g. a list), else ValueError.
    """
    try:
        if value in choices:
            return value
    except TypeError:   # unhashable value, e.g. a list, tested against a set
        pass
    names = sorted(choices, key=str)
    if not isinstance(value, str) and all(isinstance(c, str) for c in choices):
        raise TypeError(f"{name} must be a str, one of {names}, got {type(value).__name__} "
                        f"{value!r}")
    raise ValueError(f"{name} must be one of {names}, got {name}={value!r}")


def resolve_device(device) -> torch.device:
    """Normalise a device spec, so that comparisons are exact: ``"cpu:0"`` becomes ``cpu`` (torch
    has one CPU device) and ``"cuda"`` the current CUDA device."""
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"device must be a torch device or string, got device={device!r}") from e
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device must be a cpu or cuda device, got device={device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} does not exist: {torch.cuda.device_count()} CUDA "
                         f"device(s) visible")
    return dev


_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_batch(indices, losses, device: torch.device, num_samples: int,
                *, loss_name: str = "losses", values: bool = True) -> None:
    """Validate one observed batch: 1-D integer ids and 1-D float losses, same length, on ``device``.

    Range checks need the values on the host; they are made here only for CPU tensors. On a GPU the
    backend flags a batch with out-of-range ids without syncing (see gpuprune.update).
    ``values=False`` checks the metadata only (types, dtypes, shapes, devices: free while
    tracing): a compiled step, whose ``gpuprune::observe_`` op checks CPU ids at run time
    (:mod:`gpuprune.library`).
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{loss_name} must be a torch.Tensor, got {type(losses).__name__}")
    if indices.dtype not in _ID_DTYPES:
        if indices.dtype in (torch.uint16, torch.uint32, torch.uint64):
            raise TypeError(f"indices must have a signed integer dtype (int8/16/32/64) or uint8, got "
                            f"indices.dtype={indices.dtype}: torch cannot index with it; convert with "
                            f"indices.long()")
        raise TypeError(f"indices must have an integer dtype, got indices.dtype={indices.dtype}")
    if not losses.is_floating_point():
        raise TypeError(f"{loss_name} must have a floating dtype, got {loss_name}.dtype={losses.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got indices.shape={tuple(indices.shape)}")
    if losses.dim() != 1:
        hint = " (use reduction='none' to get one loss per sample)" if losses.dim() == 0 else ""
        raise ValueError(f"{loss_name} must be 1-D, one value per sample, got "
                         f"{loss_name}.shape={tuple(losses.shape)}{hint}")
    if indices.numel() != losses.numel():
        raise ValueError(f"indices and {loss_name} must have the same length, got "
                         f"{indices.numel()} and {losses.numel()}")
    if indices.device != device:
        raise ValueError(f"indices must be on {device}, got indices.device={indices.device}")
    if losses.device != device:
        raise ValueError(f"{loss_name} must be on {device}, got {loss_name}.device={losses.device}")
    if values and device.type == "cpu":
        check_id_range(indices, num_samples)


def check_id_range(indices: torch.Tensor, num_samples: int) -> None:
    """Raise ValueError naming the first bound broken if a (CPU) id lies outside
    ``[0, num_samples)``. Reads the values: two host syncs on a GPU, so callers make it on the CPU
    only (:func:`check_batch`, and the ``gpuprune::observe_`` op of a compiled CPU step)."""
    if indices.numel():
        lo, hi = torch.aminmax(indices)                      # one pass over the ids
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_samples:
            bad = lo if lo < 0 else hi
            raise ValueError(f"indices must lie in [0, {num_samples}), got an index {bad}")


class _Missing:
    """Stands for a setting one configuration has and another lacks."""

    def __repr__(self) -> str:
        return "<missing>"


#: the value :func:`config_differences` reports for a setting a configuration lacks
MISSING = _Missing()


def flatten_config(config: dict, prefix: str = "") -> dict:
    """A nested configuration dict as one level, nested keys joined by dots (``"policy.c"``): the
    names configuration differences are reported by."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(*configs: dict) -> dict[str, list]:
    """The settings (dotted names, sorted) whose values are not all equal across ``configs``, each
    with its value in every configuration (:data:`MISSING` where absent). The one comparison
    behind the checkpoint check (:mod:`gpuprune.state`) and the cross-rank check
    (:mod:`gpuprune.distributed`)."""
    flat = [flatten_config(c) for c in configs]
    out = {}
    for key in sorted(set().union(*flat), key=str):
        values = [f.get(key, MISSING) for f in flat]
        if any(v is MISSING for v in values) or any(v != values[0] for v in values[1:]):
            out[key] = values
    return out
