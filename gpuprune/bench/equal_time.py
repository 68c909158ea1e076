"""Full data for the same charged time: the equal-time baseline of every row.

A method is worth its time only if it beats what full-data training reaches in the same time.
Training full data for *the same number of optimizer steps* (``full_short``) is not that: a
method that scores, selects or re-scores pays for it in time, not in steps. So, per seed, the
benchmark trains full data on shortened schedules (the *ladder*: the schedule compressed onto a
fraction of the full run's optimizer steps, exactly as ``full_short`` is) and compares each
method with the ladder at the method's own charged time:

1. **Cost line.** Fit ``seconds = a + b * steps`` by least squares over the seed's ladder runs
   (the full run and ``full_short`` included; with one run, ``a = 0``). Full-data training costs
   the same per step in every run of a seed, so one line fits them, and a fitted line is less
   noisy than any single run's time.
2. **Equivalent steps.** ``s* = (t - a) / b``: the full-data steps that cost the method's charged
   time ``t``.
3. **Accuracy at s\\*.** Linear in steps between the two ladder runs that bracket ``s*``. The
   ladder's fractions are 0.1 apart (:data:`gpuprune.bench.config.LADDER`): accuracy is concave
   in steps, and with measured curvatures of a few points per unit fraction squared the linear
   interpolation errs by about ``|f''| h**2 / 8``, a few hundredths of a point.

A method slower than full data (``s* >= `` the full run's steps) has no shorter full-data run to
match: it is compared with full data itself, which costs less (status ``"slower"``).

Which ladder runs are needed is decided from the methods' times (:func:`rungs_to_add`): for each
method, the grid fractions just below and just above ``s*``, unless a run already covers them
(``full_short`` at p covers fraction about 1 - p). After they ran, the line is refitted and the
check repeated (a few rounds at most).

This is a *time-budgeted* comparison built from step-budgeted runs: a run cannot be stopped at a
time budget without breaking its learning-rate schedule (the schedule must know its length), so
the ladder brackets the time instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Rung", "EqualTime", "fit_cost", "cost_scatter", "equivalent_steps",
           "accuracy_at_steps", "equal_time", "grid_steps", "rungs_to_add", "COVER"]

#: a run within this share of the full run's steps of a grid point covers it
COVER = 0.02


@dataclass(frozen=True)
class Rung:
    """One full-data run of the ladder.

    Attributes:
        steps: optimizer steps it trained.
        seconds: its charged time on the compared clock.
        acc: its final test accuracy, percent.
    """

    steps: int
    seconds: float
    acc: float


@dataclass(frozen=True)
class EqualTime:
    """Full data at a method's charged time.

    Attributes:
        steps: ``s*``, the full-data steps that cost that time (fractional).
        fraction: ``s*`` over the full run's steps.
        acc: the ladder's accuracy at ``s*`` (the full run's when ``status == "slower"``; nan
            when ``"outside"``).
        status: ``"interpolated"``; ``"slower"`` (the method costs more than full data, compared
            with full data); ``"outside"`` (no ladder run at or below ``s*``: not comparable).
    """

    steps: float
    fraction: float
    acc: float
    status: str


def fit_cost(rungs: list[Rung]) -> tuple[float, float]:
    """``(a, b)`` of the least-squares line ``seconds = a + b * steps`` over ``rungs``.

    One rung (or rungs all of one length) gives the line through the origin and their mean.

    Raises:
        ValueError: no rungs, or a line whose slope is not positive.
    """
    if not rungs:
        raise ValueError("fit_cost needs at least one ladder run")
    xs = [float(r.steps) for r in rungs]
    ys = [float(r.seconds) for r in rungs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0.0:
        a, b = 0.0, my / mx
    else:
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
        a = my - b * mx
    if not b > 0.0:
        raise ValueError(f"the ladder's time per step must be positive, got {b!r} from "
                         f"{[(r.steps, r.seconds) for r in rungs]}")
    return a, b


def cost_scatter(rungs: list[Rung]) -> float:
    """Root-mean-square relative deviation of the rungs' times from their fitted cost line: the
    timing noise of this seed's ladder (0 for a perfect line; nan with fewer than 3 rungs)."""
    if len(rungs) < 3:
        return float("nan")
    a, b = fit_cost(rungs)
    return math.sqrt(sum(((r.seconds - (a + b * r.steps)) / (a + b * r.steps)) ** 2
                         for r in rungs) / len(rungs))


def equivalent_steps(seconds: float, cost: tuple[float, float]) -> float:
    """Full-data steps that cost ``seconds`` on the line ``cost = (a, b)``."""
    a, b = cost
    return (seconds - a) / b


def accuracy_at_steps(rungs: list[Rung], steps: float) -> float:
    """Accuracy linearly interpolated in steps between the rungs around ``steps`` (the mean of
    rungs of equal length); nan outside the rungs' range."""
    by_steps: dict[int, list[float]] = {}
    for r in rungs:
        by_steps.setdefault(r.steps, []).append(r.acc)
    pts = sorted((s, sum(a) / len(a)) for s, a in by_steps.items())
    if not pts or steps < pts[0][0] or steps > pts[-1][0]:
        return float("nan")
    for (s0, a0), (s1, a1) in zip(pts, pts[1:]):
        if s0 <= steps <= s1:
            return a0 + (a1 - a0) * (steps - s0) / (s1 - s0)
    return pts[0][1]                      # a single rung, at exactly its length


def equal_time(rungs: list[Rung], seconds: float, full_steps: int) -> EqualTime:
    """Full data at charged time ``seconds``: see the module docstring.

    Args:
        rungs: the seed's ladder (the full run, of ``full_steps`` steps, among them).
        seconds: the method's charged time on the same clock.
        full_steps: the full run's optimizer steps.
    """
    s_star = equivalent_steps(seconds, fit_cost(rungs))
    fraction = s_star / full_steps
    if s_star >= full_steps:
        full = [r.acc for r in rungs if r.steps == full_steps]
        return EqualTime(s_star, fraction, sum(full) / len(full) if full else float("nan"),
                         "slower")
    acc = accuracy_at_steps(rungs, s_star)
    return EqualTime(s_star, fraction, acc, "outside" if math.isnan(acc) else "interpolated")


def grid_steps(fraction: float, full_steps: int) -> int:
    """Optimizer steps of the ladder run at ``fraction`` of the full run (at least 1)."""
    return max(1, round(fraction * full_steps))


def rungs_to_add(rungs: list[Rung], method_seconds: list[float], full_steps: int,
                 grid: tuple[float, ...]) -> list[int]:
    """Step counts of the ladder runs still needed so that every method's ``s*`` is bracketed by
    runs at most one ``grid`` step apart.

    For ``s*`` between grid points ``lo <= s* <= hi``: a run is needed in ``[lo - c, s*]`` and
    one in ``[s*, hi + c]`` (``c`` = :data:`COVER` of the full run's steps, so that ``full_short``
    at about ``1 - p`` stands in for a grid point); when there is none, the grid point itself is
    added. Below the smallest grid point, ``lo`` is 90 % of ``s*``. Methods slower than full data
    need nothing. Returns the new step counts, ascending.
    """
    cost = fit_cost(rungs)
    have = [r.steps for r in rungs]
    tol = COVER * full_steps
    points = sorted(grid_steps(f, full_steps) for f in set(grid) | {1.0})
    need: set[int] = set()
    for t in method_seconds:
        s = equivalent_steps(t, cost)
        if not s < full_steps:
            continue
        below = [g for g in points if g <= s]
        lo = below[-1] if below else max(1, math.floor(0.9 * s))
        hi = next(g for g in points if g >= s)
        if not any(lo - tol <= h <= s for h in have):
            need.add(lo)
        if not any(s <= h <= hi + tol for h in have):
            need.add(hi)
    return sorted(need)
