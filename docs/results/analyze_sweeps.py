"""Tables of docs/results.md's "Sensitivity sweeps and 30-epoch exploitation" from the raw rows.

    python docs/results/analyze_sweeps.py docs/results/sweeps docs/results/exploit30

The first folder holds one sub-folder per sweep invocation (`results.csv`, its name the setting:
`c0.5_eps0.05`, `decay0.5`, `interval2`, `default`, ...); each table row is mean ± sample std over
the invocation's seeds (with 2 seeds the std is |difference| / sqrt 2), `Δ default` is paired by seed
against the `default` invocation. Other sub-folders are listed per seed: `retest_*` paired against
`retest_default` (fresh seeds), the rest against run c (`../mlp10_sched`, the default's training on
seeds 0-2). The second folder's `exploitation.csv` gives the planned samples'
mean current loss over all samples' mean per epoch, averaged here over epochs 1-2 (the first sweep
over the data), 3-10, 11-20, 21-30 (epochs counted from 1; full-data epochs excluded). Only the standard library.
"""

from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict

from analyze import ms          # mean ± sample std, as in the main tables (same folder)

LABEL = {"full": "full data", "full_short": "full data, same steps", "uniform": "uniform",
         "epsilon_greedy": "ε-greedy", "ucb": "UCB"}
KNOBS = [("UCB c and ε (paired: UCB reads c, ε-greedy reads ε)",
          ["c0.5_eps0.05", "default", "c2_eps0.2", "c4_eps0.4"]),
         ("EMA decay (both policies; default 0.9)", ["decay0.5", "default", "decay0.99"]),
         ("selection interval (epochs between two selections; default 1)",
          ["default", "interval2", "interval3"])]
SETTING = {"default": "default (c 1, ε 0.1, decay 0.9, interval 1)",
           "c0.5_eps0.05": "c 0.5, ε 0.05", "c2_eps0.2": "c 2, ε 0.2", "c4_eps0.4": "c 4, ε 0.4",
           "decay0.5": "decay 0.5", "decay0.99": "decay 0.99", "interval2": "interval 2",
           "interval3": "interval 3"}


def read(path: str) -> dict:
    """method -> {seed: row} of one results.csv, numbers as floats."""
    out: dict = defaultdict(dict)
    for r in csv.DictReader(open(path)):
        for k, v in list(r.items()):
            try:
                r[k] = float(v)
            except (TypeError, ValueError):
                pass
        out[r["method"]][int(r["seed"])] = r
    return out


def sweeps(folder: str) -> None:
    runs = {name: read(os.path.join(folder, name, "results.csv"))
            for name in sorted(os.listdir(folder))
            if os.path.exists(os.path.join(folder, name, "results.csv"))}
    ref = runs.get("default")
    if ref is None:  # the same training, timed in run c (deterministic per seed: same accuracies)
        ref = read(os.path.join(folder, "..", "mlp10_sched", "results.csv"))
        print("(Δ default against run c's rows: no `default` invocation here)")
    for title, names in KNOBS:
        print(f"\n**{title}**\n")
        print("| setting | method | acc % | Δ full | Δ default | CPU s | speed-up | overlap | lock-in |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in names:
            if name not in runs:
                print(f"| {SETTING.get(name, name)} | not run | | | | | | | |")
                continue
            for m in ("epsilon_greedy", "ucb"):
                rs = runs[name].get(m, {})
                seeds = sorted(rs)
                col = lambda k: [rs[s][k] for s in seeds]
                if ref and m in ref and name != "default":
                    d = [rs[s]["test_acc"] - ref[m][s]["test_acc"] for s in seeds if s in ref[m]]
                    dd = ms(d)
                else:
                    dd = "–"
                print(f"| {SETTING.get(name, name)} | {LABEL[m]} | {ms(col('test_acc'), '{:.2f}')} | "
                      f"{ms(col('delta_full'))} | {dd} | {ms(col('cpu_s'), '{:.1f}')} | "
                      f"{ms(col('cmp_speedup'), '{:.2f}')}× | {ms(col('overlap_mean'), '{:.2f}')} | "
                      f"{sum(1 for x in col('lock_in_epochs') if x >= 3)}/{len(seeds)} |")
    print("\n**Baselines in each invocation** (accuracies identical in every one: training is "
          "deterministic per seed)\n")
    print("| invocation | full data CPU s | full data, same steps: acc % | CPU s | speed-up |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        if "full_short" not in run:
            continue
        f, s = run["full"], run["full_short"]
        print(f"| {SETTING.get(name, name)} | {ms([r['cpu_s'] for r in f.values()], '{:.1f}')} | "
              f"{ms([r['test_acc'] for r in s.values()], '{:.2f}')} | "
              f"{ms([r['cpu_s'] for r in s.values()], '{:.1f}')} | "
              f"{ms([r['cmp_speedup'] for r in s.values()], '{:.2f}')}× |")
    known = {n for _, names in KNOBS for n in names}
    runc = read(os.path.join(folder, "..", "mlp10_sched", "results.csv"))
    for name, run in runs.items():
        if name in known:
            continue
        base = runs.get("retest_default") if name.startswith("retest") else runc
        print(f"\nextra invocation {name} (Δ default paired by seed against "
              f"{'retest_default' if name.startswith('retest') else 'run c'}):")
        for m in ("epsilon_greedy", "ucb"):
            for s, r in sorted(run.get(m, {}).items()):
                dd = (f"{r['test_acc'] - base[m][s]['test_acc']:+.2f}"
                      if base is not run and base and s in base.get(m, {}) else "–")
                print(f"- {LABEL[m]} seed {s}: {r['test_acc']:.2f} %, Δ full {r['delta_full']:+.2f}, "
                      f"Δ default {dd}, speed-up {r['cmp_speedup']:.2f}×, "
                      f"overlap {r['overlap_mean']:.2f}")
    accs = {name: [r["test_acc"] for r in run["full"].values()] for name, run in runs.items()}
    print(f"\nfull data accuracies per invocation: {accs}")


def exploitation(folder: str) -> None:
    rows = list(csv.DictReader(open(os.path.join(folder, "exploitation.csv"))))
    per: dict = defaultdict(dict)
    for r in rows:
        if r["full"] in ("True", "1", "true"):
            continue
        per[r["method"]][int(r["epoch"])] = (float(r["ratio"]), float(r["top"]))
    res = read(os.path.join(folder, "results.csv"))
    print("\n**Exploitation over 30 epochs** (planned samples' mean current loss / all samples' "
          "mean; in brackets the share of the plan among the top-k losses, uniform ≈ 0.5)\n")
    print("| method | acc % | Δ full | CPU s | speed-up | epochs 1–2 | 3–10 | 11–20 | 21–30 "
          "| overlap |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    first = min(min(e) for e in per.values())
    for m in ("uniform", "epsilon_greedy", "ucb"):
        if m not in per:
            continue
        e = per[m]
        cells = []
        for lo, hi in ((1, 2), (3, 10), (11, 20), (21, 30)):
            ks = [k for k in e if lo <= k - first + 1 <= hi]
            rat = sum(e[k][0] for k in ks) / len(ks)
            top = sum(e[k][1] for k in ks) / len(ks)
            cells.append(f"{rat:.2f} ({top:.2f})")
        r = res[m][0]
        print(f"| {LABEL[m]} | {r['test_acc']:.2f} | {r['delta_full']:+.2f} | {r['cpu_s']:.1f} | "
              f"{r['cmp_speedup']:.2f}× | "
              f"{' | '.join(cells)} | {r['overlap_mean']:.2f} |")
    print("\nPer epoch (ratio):\n")
    for m, e in per.items():
        print(f"- {LABEL.get(m, m)}: " + ", ".join(f"{e[k][0]:.2f}" for k in sorted(e)))
    print(f"\n(first pruned epoch index in exploitation.csv: {first})")
    for m in ("full", "full_short"):
        if m in res:
            r = res[m][0]
            print(f"{LABEL[m]}: {r['test_acc']:.2f} %, CPU {r['cpu_s']:.1f} s")


if __name__ == "__main__":
    sweeps(sys.argv[1])
    if len(sys.argv) > 2:
        exploitation(sys.argv[2])
