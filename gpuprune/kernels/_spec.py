"""What the Python side knows about ``csrc/gpuprune_kernels.cu``: names, signatures, constants.

A test parses the source and checks every entry here against it, so the two cannot drift apart.
"""

from __future__ import annotations

__all__ = ["SIGNATURES", "KERNEL_NAMES", "CONSTANTS", "PASSES", "CTL_BYTES", "CTL_OFFSETS",
           "PLAN_ARGS"]

#: the arguments of gp_plan, in order (``p`` pointer, ``q`` long long, ``d`` double)
PLAN_ARGS: tuple[tuple[str, str], ...] = (
    ("mean", "p"), ("var", "p"), ("last", "p"), ("given", "p"), ("ids", "p"), ("nids", "q"),
    ("prev", "p"), ("prev_size", "q"), ("sel_in", "p"), ("sel_out", "p"), ("out", "p"),
    ("rescaled", "p"), ("overlap", "p"), ("hi", "p"), ("cand", "p"), ("marks", "p"), ("ctl", "p"),
    ("n", "q"), ("k", "q"), ("mode", "q"), ("flags", "q"), ("s1lo", "q"), ("s1hi", "q"),
    ("explore", "q"), ("s2lo", "q"), ("s2hi", "q"), ("plo", "q"), ("phi", "q"), ("p0", "d"),
    ("p1", "d"), ("p2", "d"),
)

#: kernel name -> argument kinds: ``p`` pointer, ``q`` long long, ``Q`` unsigned long long, ``d`` double
SIGNATURES: dict[str, str] = {
    "gp_observe_small": "pppqqpppppdqq",
    "gp_observe_sorted": "ppppqqpppppdq",
    "gp_plan": "".join(kind for _, kind in PLAN_ARGS),
}

KERNEL_NAMES: tuple[str, ...] = tuple(SIGNATURES)

#: the ``#define``s of the source that the launch code relies on
CONSTANTS: dict[str, int] = {
    "GP_SEL_THREADS": 256,
    "GP_MAX_BINS": 2048,
    "GP_MAX_GRID": 1024,
    "GP_SUM_TILE": 2048,
    "GP_OBS_THREADS": 256,
    "GP_OBS_SMALL_MAX": 4096,
    "GP_OBS_SMALL_THREADS": 1024,
    "GP_OBS_TABLE": 8192,
    "GP_SCORE_HASH": 0,
    "GP_SCORE_MEAN": 1,
    "GP_SCORE_UCB_STD": 2,
    "GP_SCORE_UCB_VAR": 3,
    "GP_SCORE_BELOW_MEAN": 4,
    "GP_SCORE_GIVEN": 5,
    "GP_PLAN_FULL": 1,
    "GP_PLAN_IDS": 2,
    "GP_PLAN_SHUFFLE": 4,
    "GP_PLAN_COUNT": 8,
    "GP_PLAN_PREV": 16,
    "GP_PLAN_PREV_FULL": 32,
    "GP_PLAN_BELOW": 64,
    "GP_DRIFT_SHIFT": 20,
}

#: the six radix digits of a 64-bit key, most significant first: (shift, width). Passes 0-2 cover
#: the score word, 3-5 the tie-break hash (where a hash-only selection starts).
PASSES: tuple[tuple[int, int], ...] = ((53, 11), (42, 11), (32, 10), (21, 11), (10, 11), (0, 10))

#: byte offsets of the fields of ``struct GpPlanCtl`` (six u64, twelve u32, the per-block counts,
#: the per-unit partial sums, the histogram)
CTL_OFFSETS: dict[str, int] = {
    "prefix": 0, "thresh": 8, "thresh1": 16, "inter": 24, "scale": 32, "mu": 40, "bits": 48,
    "need": 52, "done": 56, "k": 60, "nseen": 64, "nbelow": 68, "total": 72, "bar_count": 76,
    "bar_gen": 80, "pad": 84, "counts": 96, "partials": 96 + 4 * CONSTANTS["GP_MAX_GRID"],
    "hist": 96 + 12 * CONSTANTS["GP_MAX_GRID"],
}

#: size of ``struct GpPlanCtl``
CTL_BYTES = CTL_OFFSETS["hist"] + 4 * CONSTANTS["GP_MAX_BINS"]
