"""Where a benchmark's wall time went, so that its own tables account for all of it.

The tables charge each method only what it costs (training, selection, re-scoring, scoring). A
sweep also loads data, warms up, evaluates every run on the test set, builds models and loaders,
trains the equal-time ladder and writes files; :class:`Timeline` records each of those in wall
seconds, and :meth:`Timeline.lines` prints them with what is left over ("not accounted"), which
is then only the interpreter's own start and the gaps between measured parts.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

__all__ = ["Timeline", "process_age"]


def process_age() -> float | None:
    """Wall seconds since this process started (Linux ``/proc``), or None where unknown. It
    covers the interpreter's start and the imports before any of our code ran."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])          # field 22 of stat(5), counted after "pid (comm)"
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class Timeline:
    """Wall seconds per named part of a benchmark, in the order first seen.

    Example:
        >>> t = Timeline()
        >>> with t.phase("data"):
        ...     pass
        >>> list(t.parts)
        ['data']
    """

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.start = time.perf_counter()
        self.start_cpu = time.process_time()

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to part ``name``."""
        self.parts[name] = self.parts.get(name, 0.0) + float(seconds)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block into part ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def total(self) -> float:
        """Wall seconds since the timeline started."""
        return time.perf_counter() - self.start

    def summary(self, before: float = 0.0) -> dict:
        """``{"total_s", "cpu_s", "parts": {name: s}, "not_accounted_s"}``; ``before`` is time
        spent before the timeline started (the process's start-up), counted as a part."""
        parts = dict(self.parts)
        if before > 0.0:
            parts = {"start-up (interpreter, imports)": before, **parts}
        total = self.total() + before
        return {"total_s": total, "cpu_s": time.process_time(), "parts": parts,
                "not_accounted_s": total - sum(parts.values())}

    @staticmethod
    def lines(summary: dict, width: int = 120) -> list[str]:
        """The summary as text lines of at most ``width`` characters (parts under 0.05 s left
        out; they are in the summary)."""
        head = (f"time accounted (wall s): total {summary['total_s']:.1f} (process CPU "
                f"{summary['cpu_s']:.1f}) =")
        items = [f"{name} {s:.1f}" for name, s in summary["parts"].items() if s >= 0.05]
        items.append(f"not accounted {summary['not_accounted_s']:.1f}")
        out, line = [], head
        for item in items:
            piece = (" " if line == head else " + ") + item
            if len(line) + len(piece) > width:
                out.append(line)
                line = "  +" + piece[2:] if piece.startswith(" + ") else "  " + piece.strip()
            else:
                line += piece
        out.append(line)
        return out
