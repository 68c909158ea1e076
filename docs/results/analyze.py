"""Tables of docs/results.md from the raw per-run rows of `gpuprune bench` (results.csv).

    python docs/results/analyze.py docs/results/mlp10_p05/results.csv [more results.csv ...]

Prints, per (sweep, prune ratio): every method's accuracy and paired differences (mean ± sample std
over seeds), its charged-time speed-up and time saved (both in reference steps, as the bench
compares them), epochs of data, overlap and lock-in runs; then the paired differences behind the
paper's three findings, and the headline: the method saving the most charged time while staying
within 0.2 pt of full data (mean over seeds). Only the standard library.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict

LABEL = {"full": "full data", "full_short": "full data, same steps", "uniform": "uniform",
         "epsilon_greedy": "ε-greedy", "epsilon_greedy+refresh": "ε-greedy + re-score pass",
         "ucb": "UCB", "ucb+refresh": "UCB + re-score pass", "infobatch": "InfoBatch",
         "infobatch+refresh": "InfoBatch + re-score pass",
         "infobatch+norescale": "InfoBatch, no rescaling",
         "infobatch+noanneal": "InfoBatch, no annealing", "static_random": "static random",
         "el2n": "static EL2N", "forgetting": "static forgetting",
         "uniform+sched": "uniform, keep schedule", "epsilon_greedy+sched": "ε-greedy, keep schedule",
         "ucb+sched": "UCB, keep schedule"}


def ms(xs: list[float], fmt: str = "{:+.2f}") -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "–"
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{fmt.format(m)} ± {fmt.format(sd).lstrip('+')}"


def mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def load(paths: list[str]) -> dict:
    """(sweep, method, p) -> {seed: row}; the full run is filed under every ratio of its sweep."""
    runs: dict = defaultdict(dict)
    for i, path in enumerate(paths):
        rows = list(csv.DictReader(open(path)))
        ratios = sorted({float(r["prune_ratio"]) for r in rows if r["method"] != "full"})
        for r in rows:
            for k, v in list(r.items()):
                try:
                    r[k] = float(v)
                except (TypeError, ValueError):
                    pass
            for p in (ratios if r["method"] == "full" else [r["prune_ratio"]]):
                runs[(path, r["method"], p)][int(r["seed"])] = r
    return runs


def main(paths: list[str]) -> None:
    runs = load(paths)
    best = []
    for path in paths:
        keys = sorted({(m, p) for (s, m, p) in runs if s == path}, key=lambda x: x[1])
        for p in sorted({p for _, p in keys}):
            methods = [m for m, q in keys if q == p]
            order = list(LABEL)
            methods.sort(key=lambda m: order.index(m) if m in order else 99)
            print(f"\n### {path}: p = {p:g}\n")
            print("| method | acc % | Δ full | Δ same steps | Δ same time | speed-up | time saved "
                  "| data ep. | overlap | lock-in |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for m in methods:
                rs = list(runs[(path, m, p)].values())
                col = lambda k: [r[k] for r in rs]
                saved = [100 * (1 - 1 / r["cmp_speedup"]) for r in rs]
                lock = sum(1 for r in rs if r["lock_in_epochs"] >= 3) if m not in (
                    "full", "full_short", "static_random", "el2n", "forgetting") else None
                print(f"| {LABEL.get(m, m)} | {ms(col('test_acc'), '{:.2f}')} | "
                      f"{ms(col('delta_full')) if m != 'full' else '–'} | "
                      f"{ms(col('delta_steps'))} | {ms(col('delta_time'))} | "
                      f"{ms(col('cmp_speedup'), '{:.2f}')}× | "
                      f"{ms(saved, '{:.0f}') + ' %' if m != 'full' else '–'} | "
                      f"{mean(col('epochs_of_data')):.2f} | {ms(col('overlap_mean'), '{:.2f}')} | "
                      f"{'–' if lock is None else f'{lock}/{len(rs)}'} |")
                if m not in ("full", "full_short") and mean(col("delta_full")) >= -0.2:
                    best.append((mean(saved), m, p, ms(col("delta_full")), ms(saved, "{:.0f}"),
                                 path))
            pairs = [("uniform", "static_random"), ("epsilon_greedy", "uniform"),
                     ("ucb", "uniform"), ("epsilon_greedy+refresh", "uniform"),
                     ("ucb+refresh", "uniform"), ("ucb+refresh", "ucb"),
                     ("epsilon_greedy+refresh", "epsilon_greedy"), ("ucb+sched", "ucb"), ("epsilon_greedy+sched", "epsilon_greedy"),
                     ("uniform+sched", "uniform"), ("infobatch+norescale", "infobatch"),
                     ("infobatch+noanneal", "infobatch")]
            lines = []
            for a, b in pairs:
                ra, rb = runs.get((path, a, p)), runs.get((path, b, p))
                if ra and rb:
                    seeds = sorted(set(ra) & set(rb))
                    d = [ra[s]["test_acc"] - rb[s]["test_acc"] for s in seeds]
                    t = [ra[s]["cmp_time"] / rb[s]["cmp_time"] for s in seeds]
                    lines.append(f"- {LABEL[a]} − {LABEL[b]}: {ms(d)} pt (charged time ratio "
                                 f"{ms(t, '{:.2f}')}, {len(seeds)} seeds)")
            if lines:
                print("\nPaired by seed:\n")
                print("\n".join(lines))
    print("\n### Within 0.2 pt of full data (mean), by time saved\n")
    for saved, m, p, d, s, path in sorted(best, reverse=True):
        print(f"- {LABEL.get(m, m)} at p = {p:g} ({path}): Δ full {d} pt, time saved {s} %")


if __name__ == "__main__":
    main(sys.argv[1:])
