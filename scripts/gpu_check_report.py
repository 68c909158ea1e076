"""Step 8 of scripts/gpu_check.sh: gpu_report.md (tables) and gpu_report.json (every figure).

    python scripts/gpu_check_report.py --work WORK_DIR --out OUT_DIR

Reads what the earlier steps left in ``WORK_DIR`` (any of them may be missing or failed; the report
says so): ``steps.tsv`` (one line per step: number, name, status, exit code, seconds, limit),
``env.json``, ``doctor.json``, the JUnit files ``pytest_equiv_cuda.xml``, ``pytest_equiv_other.xml``
and ``pytest.xml``, ``stress.json``, ``sync.json``, ``selection.log`` and ``selection.json``, and
the benchmark folders ``bench_*/results.json``. Every figure is printed beside its target.
docs/gpu_check.md explains every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["TARGETS", "read_steps", "parse_selection_log", "selection_figures", "pytest_summary",
           "e2e_rows", "build_report", "render_markdown", "main"]

#: the GPU targets of the kernels issue: name -> (figure key, comparison, bound, unit)
TARGETS = {
    "plan() at N = 1e6": ("plan_us_1e6", "<=", 50.0, "us"),
    "plan() at N = 1e8": ("plan_us_1e8", "<=", 1500.0, "us"),
    "torch.topk / plan() at N = 1e6": ("topk_ratio_1e6", ">=", 2.0, "x"),
    "torch.topk / plan() at N = 1e8": ("topk_ratio_1e8", ">=", 2.0, "x"),
    "observe() GPU time, batches <= 4096": ("observe_us_max_4096", "<=", 5.0, "us"),
}
#: methods whose runs call Pruner.observe every step (gpuprune.bench.config.SCORED)
SCORED = ("epsilon_greedy", "ucb", "infobatch")


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(path: Path) -> list[dict]:
    """steps.tsv -> [{num, name, status, rc, seconds, limit}]."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 6:
            continue
        num, name, status, rc, sec, limit = parts[:6]
        out.append({"num": num, "name": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit()
                    else None, "seconds": float(sec or 0), "limit": float(limit or 0)})
    return out


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def parse_selection_log(text: str) -> dict:
    """The two tables ``benchmarks/selection.py --device cuda`` prints, read by their headers:
    rows of the table whose header starts with ``N`` and names ``plan()``, and of the one whose
    header starts with ``batch``. Values as printed (microseconds)."""
    tables: dict[str, list[dict]] = {"selection": [], "observe": []}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        head = lines[i].split()
        kind = ("selection" if head[:1] == ["N"] and "plan()" in head else
                "observe" if head[:1] == ["batch"] and "kernels" in head else None)
        if kind is None:
            i += 1
            continue
        cols: list[str] = []
        for h in head:                     # two-word headers: "plan wall", "host k", "host t"
            if cols and cols[-1] in ("plan", "host") and h in ("wall", "k", "t"):
                cols[-1] = f"{cols[-1]}_{h}"
            else:
                cols.append(h)
        cols = ["plan" if c == "plan()" else c for c in cols]
        i += 1
        while i < len(lines) and lines[i].strip():
            vals = lines[i].split()
            if set(lines[i].strip()) <= {"-"}:
                i += 1
                continue
            if len(vals) == len(cols):
                tables[kind].append({c: _num(v) for c, v in zip(cols, vals)})
            i += 1
    return tables


def selection_figures(sel_json, sel_log: str) -> dict:
    """The figures the targets need, from the benchmark's JSON if it wrote one, else its log."""
    figs: dict = {"source": None}
    rows_sel, rows_obs = [], []
    if isinstance(sel_json, dict) and sel_json.get("selection"):
        figs["source"] = "selection.json"
        for r in sel_json["selection"]:
            rows_sel.append({"N": r.get("n"), "plan": r.get("plan_us"), "topk": r.get("topk_us"),
                             "kernels": r.get("kernels_us"), "plan_wall": r.get("plan_wall_us")})
        for r in sel_json.get("observe", []):
            rows_obs.append({"batch": r.get("batch"), "kernels": r.get("kernels_us")})
    elif sel_log:
        t = parse_selection_log(sel_log)
        if t["selection"]:
            figs["source"] = "selection.log (printed table)"
        rows_sel, rows_obs = t["selection"], t["observe"]
    for r in rows_sel:
        n = r.get("N")
        if n is None or (isinstance(n, float) and math.isnan(n)):
            continue
        for size, tag in ((1e6, "1e6"), (1e8, "1e8")):
            if abs(n - size) < 0.5:
                plan, topk = r.get("plan"), r.get("topk")
                figs[f"plan_us_{tag}"] = plan
                if plan and topk:
                    figs[f"topk_ratio_{tag}"] = topk / plan
    small = [r.get("kernels") for r in rows_obs if r.get("batch") is not None
             and r["batch"] <= 4096 and r.get("kernels") is not None]
    if small:
        figs["observe_us_max_4096"] = max(small)
    figs["selection_rows"], figs["observe_rows"] = rows_sel, rows_obs
    return figs


def _target_rows(figs: dict) -> list[dict]:
    rows = []
    for name, (key, op, bound, unit) in TARGETS.items():
        v = figs.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            rows.append({"target": name, "bound": f"{op} {bound:g} {unit}", "figure": None, "met": None})
            continue
        met = v <= bound if op == "<=" else v >= bound
        rows.append({"target": name, "bound": f"{op} {bound:g} {unit}", "figure": v, "met": met})
    return rows


def pytest_summary(path: Path) -> dict | None:
    """Counts and failing test ids from a JUnit XML file."""
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": str(e)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
                bad.append(f"{case.get('classname')}::{case.get('name')}: {tag}: {msg}")
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    tot["failing"] = bad
    return tot


def e2e_rows(results: dict, observe_host_us: float | None) -> list[dict]:
    """One row per run of a ``gpuprune bench`` results.json, with per-step time and the estimated
    pruning overhead: (plan time + steps x observe() host time) / charged epoch time."""
    rows = []
    for r in results.get("runs", []):
        steps = r.get("steps") or 0
        train, select = r.get("train_s") or 0.0, r.get("select_s") or 0.0
        busy = train + select
        observe = (steps * observe_host_us * 1e-6 if observe_host_us is not None
                   and r.get("method") in SCORED else 0.0)
        rows.append({"model": r.get("model"), "method": r.get("method"),
                     "prune_ratio": r.get("prune_ratio"), "test_acc": r.get("test_acc"),
                     "total_s": r.get("total_s"), "train_s": train, "select_s": select,
                     "refresh_s": r.get("refresh_s"), "steps": steps, "epochs": r.get("epochs"),
                     "ms_per_step": 1e3 * busy / steps if steps else None,
                     "plan_share": select / busy if busy else None,
                     "observe_share_est": observe / busy if busy else None,
                     "overhead_share_est": (select + observe) / busy if busy else None,
                     "speedup": r.get("speedup")})
    return rows


def build_report(work: Path) -> dict:
    """Everything the steps left, in one JSON-ready dict."""
    rep: dict = {"generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "steps": read_steps(work / "steps.tsv"), "env": _load(work / "env.json"),
                 "doctor": _load(work / "doctor.json"),
                 "pytest": {name: pytest_summary(work / f"{stem}.xml") for name, stem in (
                     ("equivalence suite, cuda backend", "pytest_equiv_cuda"),
                     ("equivalence suite, other backends", "pytest_equiv_other"),
                     ("pytest -m gpu, other files", "pytest"))},
                 "stress": _load(work / "stress.json"), "sync": _load(work / "sync.json")}
    log = (work / "selection.log").read_text(errors="replace") if (work / "selection.log").is_file() else ""
    figs = selection_figures(_load(work / "selection.json"), log)
    sel_json = _load(work / "selection.json")
    cost = (sel_json or {}).get("cost") if isinstance(sel_json, dict) else None
    rep["selection"] = {"figures": figs, "targets": _target_rows(figs), "cost": cost,
                        "log_tail": "\n".join(log.strip().splitlines()[-60:])}
    obs = None
    sync = rep["sync"] or {}
    for name in ("cuda", "torch"):       # the host time of observe() for the e2e overhead
        c = (sync.get("backends", {}).get(name) or {}).get("costs")
        if c and "observe_host_us" in c:
            obs = c["observe_host_us"]
            rep["observe_host_us_used"] = {"backend": name, "us": obs}
            break
    rep["e2e"] = {}
    for d in sorted(work.glob("bench_*")):
        res = _load(d / "results.json")
        if res is not None:
            rep["e2e"][d.name] = {"command": res.get("command"), "dataset": res.get("dataset"),
                                  "rows": e2e_rows(res, obs)}
    return rep


def _f(v, fmt: str = ".2f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def render_markdown(rep: dict) -> str:
    L: list[str] = []
    env = (rep.get("env") or {}).get("environment") or {}
    smi = (rep.get("env") or {}).get("nvidia_smi") or {}
    gpu = smi.get("name") or env.get("gpu_name") or "no GPU"
    L += [f"# gpuprune GPU check: {gpu}", "",
          f"Generated {rep['generated']} by `bash scripts/gpu_check.sh` (docs/gpu_check.md explains "
          "every figure).", ""]
    L += ["## Steps", ""]
    L += _table(["#", "step", "result", "exit", "seconds", "limit s"],
                [[s["num"], s["name"], s["status"], _f(s["rc"], "d"), _f(s["seconds"], ".0f"),
                  _f(s["limit"], ".0f")] for s in rep["steps"]])
    e = rep.get("env") or {}
    L += ["", "## 1. Environment", ""]
    if e:
        kl = e.get("kernels_loaded") or {}
        L += [f"- GPU: {gpu}; driver {smi.get('driver_version', '?')}; memory "
              f"{smi.get('memory.total', '?')}; SM clock {smi.get('clocks.sm', '?')} (max "
              f"{smi.get('clocks.max.sm', '?')}); compute capability {env.get('capability')}; "
              f"{env.get('sm_count')} SMs",
              f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
              f"CuPy {env.get('cupy')} (NVRTC {env.get('nvrtc')}), numpy {env.get('numpy')}, "
              f"DALI {env.get('dali') or 'not installed'}",
              f"- fatbin: {e.get('fatbin', '-')}; {e.get('fatbin_freshness')}: "
              f"{e.get('fatbin_freshness_why')}",
              "- kernels loaded by backend='auto': " + (
                  f"{kl['build']} build ({kl['path']}, {kl['load_s']:.1f} s)" if "build" in kl
                  else f"FAILED: {kl.get('error', 'not tried')}")]
        builds = e.get("builds") or {}
        rows = []
        for kind, label, target in (("fatbin", "fatbin", "loads (else reported; NVRTC is used)"),
                                    ("source", "NVRTC (source)", "loads")):
            b = builds.get(kind)
            if b is None:
                continue
            got = ("not tried: " + b.get("why", "")) if not b.get("tried") else (
                f"loads ({b['load_s']:.1f} s)" if b.get("ok") else
                "CANNOT LOAD: " + b.get("error", "")[:200])
            rows.append([label, got, target])
        if rows:
            L += [""] + _table(["build", "result", "target"], rows)
    else:
        L.append("not recorded (step 1 failed)")
    d = rep.get("doctor") or {}
    L += ["", "## 2. gpuprune doctor", ""]
    if d:
        b = d.get("backend") or {}
        L += [f"Result: **{d.get('result')}**" + (f": {d.get('reason')}" if d.get("reason") else ""),
              "", f"Backend `auto`: {b.get('backend')} ({b.get('build')}): {b.get('reason')}", "",
              f"Compared: {', '.join(d.get('candidates', []))} vs {', '.join(d.get('references', []))}", ""]
        L += _table(["check", "ok", "comparisons", "detail"],
                    [[c["name"], _f(c["ok"]), c["comparisons"], c["detail"]] for c in d.get("checks", [])])
    else:
        L.append("no report (step 2 failed before writing it)")
    L += ["", "## 3. The kernel equivalence suite and the GPU tests", ""]
    prow, failing = [], []
    for name, p in (rep.get("pytest") or {}).items():
        target = "all pass, none skipped" if "cuda" in name else "0 failed, 0 errors"
        if p and "tests" in p:
            prow.append([name, p["tests"], p["passed"], p["failures"], p["errors"], p["skipped"],
                         target])
            failing += p["failing"][:25]
        else:
            prow.append([name, "no JUnit report", "-", "-", "-", "-", target])
    L += _table(["tests", "run", "passed", "failed", "errors", "skipped", "target"], prow)
    L += [f"- {x}" for x in failing[:25]]
    s = rep.get("stress")
    L += ["", "## 4. Stress: kernels vs torch", ""]
    if s:
        rows = [["selections (sets and counts)", s["selections"], s["selection_mismatches"], 0],
                ["plans (plan, counts, overlap, rescaled bits, kernel count)", s.get("plans", 0),
                 s.get("plan_mismatches", 0), 0],
                ["observe (pinned decays, <= 16 copies)", s["observe_batches"], s["observe_mismatches"], 0],
                ["observe (random decays, <= 64 copies)", s["observe_heavy_batches"],
                 s["observe_heavy_mismatches"], 0]]
        m = s.get("mutant")
        if m:
            rows.append([f"mutant: {m['name']} (plans)", m["plans"], m["mismatches"],
                         "> 0 shows the stress sees it (informative)"])
        L += _table(["what", "count", "mismatches", "target"], rows)
        L += ["", f"Largest N {s['largest_n']:,} (plans: {s.get('plan_largest_n', 0):,}); CUDA error: "
                  f"{s.get('cuda_error') or 'none'} (target: none); {s['seconds']:.0f} s; "
                  f"{s['candidate']} vs {', '.join(s['references'])}"]
        L += [f"- {x}" for x in s.get("first", []) + s.get("errors", [])]
    else:
        L.append("no figures (step 4 failed)")
    y = rep.get("sync")
    L += ["", "## 5. Host synchronisation, counted", ""]
    if y:
        exp = y.get("expected", {})
        rows, prow = [], []
        for name, r in y.get("backends", {}).items():
            if "error" in r:
                rows.append([name, "ERROR " + r["error"], "-", "-", "-", "-"])
                continue
            c = r.get("costs") or {}
            for pol in ("ucb", "infobatch"):
                o = r.get(f"observe_{pol}")
                if o:
                    rows.append([name, pol, f"{o['syncs']} (target {exp.get('observe_syncs', 0)})",
                                 f"{_f(o['host_s'] * 1e3)} ms of {_f(o['sleep_s'])} s, GPU busy after: "
                                 f"{_f(o['gpu_still_busy'])}", _f(c.get("observe_host_us"), ".1f"),
                                 _f(c.get("observe_gpu_us"), ".2f")])
            for pol, q in (r.get("plan") or {}).items():
                target = f"<= {exp.get('plan_blocking', 1)}" if r.get("backend") == "cuda" else "-"
                prow.append([pol, name, q["syncs"], q["blocking"], target, _f(q.get("gpu_still_busy")),
                             _f(c.get("plan", {}).get(pol, {}).get("plan_wall_us_median"), ".0f"),
                             "; ".join(q.get("ops", []))])
        L += _table(["backend", "policy", "observe() x20 syncs", "behind a GPU sleep",
                     "observe host us/call (target -)", "observe GPU us/call (target <= 5)"], rows)
        L += ["", f"Per `plan()` at N = {y.get('n', 0):,}, behind a 0.2 s GPU sleep:", ""]
        L += _table(["policy", "backend", "syncs", "blocking", "target (blocking)",
                     "GPU busy after", "plan() wall us", "what synchronised"], prow)
    else:
        L.append("no figures (step 5 failed)")
    sel = rep.get("selection") or {}
    L += ["", "## 6. Selection benchmark (`benchmarks/selection.py --device cuda`)", ""]
    figs = sel.get("figures") or {}
    L.append(f"Figures read from: {figs.get('source') or 'nothing (the benchmark failed or printed no table)'}")
    L.append("")
    L += _table(["target", "bound", "measured", "met"],
                [[t["target"], t["bound"], _f(t["figure"]), _f(t["met"], none="not measured")]
                 for t in sel.get("targets", [])])
    cost = sel.get("cost") or {}
    if cost.get("plan"):
        L += ["", "Device operations per `plan()` on the GPU (counted; target <= 8 with the kernels) and "
                  "the H100 estimate of the cost model beside them (an estimate, not a measurement):", ""]
        L += _table(["plan()", "device ops", "target", "host reads", "bytes/sample",
                     "H100 est. us @1e6", "sequence"],
                    [[k, r["device_ops"], "<= 8" if k.endswith("/kernels") else "-", r["host_reads"],
                      _f(r["bytes_per_sample"], ".0f"), _f(r["h100_us_1e6"], ".0f"),
                      " -> ".join(r["sequence"]) if k.endswith("/kernels") else ""]
                     for k, r in cost["plan"].items()])
    if sel.get("log_tail"):
        L += ["", "The benchmark's own output (last lines):", "", "```", sel["log_tail"], "```"]
    L += ["", "## 7. End to end (`gpuprune bench --device cuda`, Fashion-MNIST, prune ratio 0.5)", ""]
    used = rep.get("observe_host_us_used")
    if rep.get("e2e"):
        L.append("Overhead (est.) = (plan() time + steps x observe() host time"
                 + (f" {used['us']:.1f} us ({used['backend']} backend, step 5)" if used else "")
                 + ") / (train + plan time). observe() counts only for the methods that call it.")
        for name, run in rep["e2e"].items():
            L += ["", f"### {name}", "", f"`{run.get('command')}`", ""]
            L += _table(["method", "test acc %", "charged s", "plan s", "steps", "ms/step",
                         "plan share %", "overhead % (est.)", "speed-up"],
                        [[r["method"], _f(r["test_acc"]), _f(r["total_s"], ".1f"), _f(r["select_s"], ".3f"),
                          r["steps"], _f(r["ms_per_step"], ".2f"),
                          _f(None if r["plan_share"] is None else 100 * r["plan_share"]),
                          _f(None if r["overhead_share_est"] is None else 100 * r["overhead_share_est"]),
                          _f(r["speedup"])] for r in run["rows"]])
    else:
        L.append("no results (step 7 failed)")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="the steps' working folder")
    ap.add_argument("--out", type=Path, required=True, help="where gpu_report.md/.json go")
    args = ap.parse_args(argv)
    rep = build_report(args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_report.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    md = render_markdown(rep)
    (args.out / "gpu_report.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
