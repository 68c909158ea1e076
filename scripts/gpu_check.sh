#!/usr/bin/env bash
# One-call GPU verification of gpuprune (issues 13 and 20). docs/gpu_check.md gives the exact device call.
#
#   bash scripts/gpu_check.sh --prepare           # here, before the call: fatbin + data into place
#   bash scripts/gpu_check.sh --dry-run --strict  # here: is everything the call needs present?
#   bash scripts/gpu_check.sh --dry-run --files-only   # only the carried files and the size
#   bash scripts/gpu_check.sh                     # on the GPU machine: every step, within 3.5 min
#   bash scripts/gpu_check.sh --quick             # on the GPU machine: the core steps, within 1 min
#   bash scripts/gpu_check.sh --steps 3,5,8       # a rerun of some steps (8 is the report)
#   bash scripts/gpu_check.sh --steps 7,8         # the end-to-end training runs (not in the default)
#   bash scripts/gpu_check.sh --budget 120        # total seconds for the steps (default 200; quick 60)
#
# Steps (each time-boxed; a failure is recorded and the next step still runs):
#   1 environment (GPU, driver, CUDA, torch, CuPy; the fatbin and NVRTC builds loaded each)
#   2 gpuprune doctor   3 the kernel equivalence suite with the cuda backend
#   3b the same suite's other backends (torch, its device path, the harness)   3g pytest -m gpu (other files)
#   4 stress: kernels vs torch (selections, plans, observe; a fence-less mutant)
#   5 host syncs of observe()/plan(), counted   6 benchmarks/selection.py --device cuda
#   7 gpuprune bench --device cuda (MLP, ResNet-18; only with --steps 7)   8 gpu_report.md + gpu_report.json
# Results: $OUT (default ./gpu_check_out): gpu_report.md, gpu_report.json, gpu_check.log and
# gpu_check_logs.tar.gz (every step's log and raw figures). It installs nothing.
# Without a CUDA GPU it runs the dry run. Exit status: 0 when every step (check) passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
DATA=${GPU_CHECK_DATA:-$ROOT/.gpu_check/data}
FMNIST_SRC=${FMNIST_SRC:-/usr/share/datasets/fashion-mnist}
CARRIED=.gpu_check/fatbin   # the fatbin travels here; the GPU run copies it into gpuprune/kernels/
OUT_DIR=${OUT:-$ROOT/gpu_check_out}
BUDGET=200            # seconds for all steps (--quick: 60); the report keeps RESERVE of them
RESERVE=12
TIMEOUT_S=240         # the device call's timeout_s: the budget plus start-up and packing
QUICK_BUDGET=60 QUICK_TIMEOUT_S=85
LIMIT_MIB=64          # what may travel with one call
EQUIV=tests/test_kernel_equivalence.py   # the kernel equivalence suite (every backend, cuda included)
# the GPU steps: number, cap in seconds, what (the dry run lists them; gpu_run uses the caps)
GPU_STEPS=(
  "1|25|environment: GPU, driver, versions; the fatbin and the NVRTC build loaded each"
  "2|30|gpuprune doctor --device cuda --require-kernels"
  "3|35|kernel equivalence suite, cuda backend: pytest $EQUIV -k cuda"
  "3b|60|kernel equivalence suite, the other backends: pytest $EQUIV tests/test_kernel_keys.py -k 'not cuda'"
  "3g|25|the GPU-marked tests of the other files: pytest -m gpu tests (without $EQUIV)"
  "4|25|stress: kernels vs torch (selections, plans, observe), and the fence-less mutant"
  "5|20|host synchronisations of observe() and plan(), counted"
  "6|30|benchmarks/selection.py --device cuda --sizes 1e6 1e8 (cost table, timings, targets)"
  "8|$RESERVE|gpu_report.md and gpu_report.json"
)
QUICK_STEPS=(
  "1|12|environment: the fatbin and the NVRTC build loaded each"
  "3|25|kernel equivalence suite, cuda backend: pytest $EQUIV -k cuda"
  "5|12|host synchronisations of plan() and observe(), counted (--quick)"
  "8|10|gpu_report.md and gpu_report.json"
)
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz
       t10k-labels-idx1-ubyte.gz)
METHODS=(full full_short uniform epsilon_greedy ucb infobatch)

MODE=auto STRICT=0 STEPS=all FILES_ONLY=0 QUICK=0 BUDGET_SET=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --prepare) MODE=prepare ;;
    --strict) STRICT=1 ;;
    --files-only) FILES_ONLY=1 ;;
    --quick) QUICK=1 ;;
    --steps) STEPS=${2:?--steps needs a list, e.g. 4,5,8}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; BUDGET_SET=1; shift ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget must be whole seconds, got $BUDGET" >&2; exit 2 ;; esac
if [ $QUICK = 1 ]; then
  [ $BUDGET_SET = 0 ] && BUDGET=$QUICK_BUDGET
  [ "$STEPS" = all ] && STEPS=1,3,5,8
  RESERVE=10
fi

device_call() {   # device_call [--quick | STEPS BUDGET]
  local arg="" t=$TIMEOUT_S
  if [ "${1:-}" = --quick ]; then arg=" --quick"; t=$QUICK_TIMEOUT_S
  elif [ -n "${1:-}" ]; then arg=" --steps $1 --budget ${2:-120}"; t=$(( ${2:-120} + 40 )); fi
  printf '{"command": "bash scripts/gpu_check.sh%s", "carry": [".gpu_check"], "timeout_s": %d}\n' "$arg" "$t"
}

list_steps() {    # the GPU steps and their caps, as the dry run and the run use them
  local budget=$1; shift
  local row num cap what total=0
  for row in "$@"; do
    IFS='|' read -r num cap what <<<"$row"
    printf '    %-3s %4s s  %s\n' "$num" "$cap" "$what"
    total=$((total + cap))
  done
  printf '    caps add up to %d s; the budget of %d s cuts the later steps when the earlier ones use theirs\n' \
    "$total" "$budget"
}

# ------------------------------------------------------------------------------------ prepare
prepare() {
  local ok=0
  mkdir -p "$DATA" || return 1
  for f in "${FILES[@]}"; do
    if [ -f "$FMNIST_SRC/$f" ]; then cp -f "$FMNIST_SRC/$f" "$DATA/$f"
    else echo "prepare: $FMNIST_SRC/$f is missing (install the Debian package dataset-fashion-mnist)"; ok=1; fi
  done
  rm -f "$CARRIED"/*.fatbin
  "$PY" - "$CARRIED" <<'EOF' || ok=1
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("gpuprune_setup", "setup.py")
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)                      # setup() runs only under __main__
out = setup.build_fatbin(Path(sys.argv[1]))         # setup.py's own nvcc command and file name
if out is None:
    sys.exit("prepare: the fatbin was not built (see the note above)")
from gpuprune.doctor import describe_fatbin, read_fatbin
print(f"prepare: {out} ({out.stat().st_size / 2**20:.2f} MiB): {describe_fatbin(read_fatbin(out))}")
EOF
  du -sh "$DATA" | sed 's/^/prepare: data /'
  [ $ok = 0 ] && echo "prepare: done; now: bash scripts/gpu_check.sh --dry-run --strict"
  return $ok
}

# ------------------------------------------------------------------------------------ dry run
NFAIL=0 NWARN=0
pass() { echo "  PASS  $*"; }
warn() { if [ $STRICT = 1 ]; then echo "  FAIL  $* (--strict)"; NFAIL=$((NFAIL + 1));
         else echo "  WARN  $*"; NWARN=$((NWARN + 1)); fi; }
fail() { echo "  FAIL  $*"; NFAIL=$((NFAIL + 1)); }

dry_run() {
  local tmp; tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX") || return 1
  echo "gpu_check --dry-run$([ $STRICT = 1 ] && echo ' --strict')$([ $FILES_ONLY = 1 ] && echo ' --files-only'): is everything the GPU call needs here?"
  # one python process for the checks that need one (each line: PASS|WARN|FAIL<TAB>text)
  "$PY" - "$CARRIED" "$DATA" "$FILES_ONLY" "${METHODS[@]}" >"$tmp/checks" 2>&1 <<'PYCHECKS'
import contextlib, importlib.util, io, runpy, sys
from pathlib import Path
carried, data, files_only, methods = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
def say(kind, text): print(f"{kind}\t{text}", flush=True)
try:
    import platform, torch, gpuprune
    bad = [m for m in ("cupy", "nvidia.dali") if m in sys.modules]
    say("FAIL" if bad else "PASS", f"import gpuprune imported {bad}" if bad else
        f"python {platform.python_version()}, torch {torch.__version__}: gpuprune imports from the "
        "tree without CuPy or DALI")
    from gpuprune.doctor import describe_fatbin, read_fatbin
except Exception as e:
    say("FAIL", f"gpuprune does not import: {type(e).__name__}: {e}"); sys.exit(0)
sys.path.insert(0, "scripts")
from gpu_check_env import fatbin_freshness
state, why = fatbin_freshness(Path(carried))
if state == "missing":
    say("WARN", f"no fatbin in {carried} (bash scripts/gpu_check.sh --prepare builds it)")
else:
    say("PASS" if state == "fresh" else "WARN", f"fatbin {state}: {why}" + ("" if state == "fresh"
        else " (bash scripts/gpu_check.sh --prepare rebuilds it; without it the GPU run tests only "
             "the NVRTC build)"))
    for p in sorted(Path(carried).glob("*.fatbin")):
        try:
            e = read_fatbin(p)
            ok = any(x.kind == "sass" and x.arch == 90 for x in e)
            say("PASS" if ok else "FAIL", (f"{p.name}: " if ok else f"{p.name} has no sm_90 SASS for "
                "the H100/H200: ") + describe_fatbin(e))
        except (OSError, ValueError) as err:
            say("FAIL", f"fatbin {p} is unreadable: {err}")
from gpuprune.data.fashion_mnist import FILES, find_fashion_mnist
names = [s + ".gz" for pair in FILES.values() for s in pair]
missing = [n for n in names if not (Path(data) / n).is_file()]
if not missing and find_fashion_mnist(data) is not None:
    size = sum((Path(data) / n).stat().st_size for n in names) / 2**20
    say("PASS", f"data: Fashion-MNIST in {data} ({size:.1f} MiB)")
else:
    say("WARN", f"data: {data} lacks {' '.join(missing) or 'readable files'} (bash "
        "scripts/gpu_check.sh --prepare copies them from /usr/share/datasets/fashion-mnist)")
if files_only:
    sys.exit(0)
bad = []
for p in sorted(Path("scripts").glob("gpu_check_*.py")):
    try:
        spec = importlib.util.spec_from_file_location(p.stem, p)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as err:
        bad.append(f"{p}: {type(err).__name__}: {err}")
say("FAIL" if bad else "PASS", "; ".join(bad) if bad else "scripts/gpu_check_*.py import")
def help_of(fn):
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            fn()
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError((buf.getvalue().strip().splitlines() or [str(e.code)])[-1])
    return buf.getvalue()
try:
    sys.argv = ["selection.py", "--help"]
    text = help_of(lambda: runpy.run_path("benchmarks/selection.py", run_name="__main__"))
    say("PASS", "benchmarks/selection.py --help runs" + (" (it writes --json)" if "--json" in text
        else " (no --json: the report reads its printed tables)"))
except Exception as err:
    say("WARN", f"benchmarks/selection.py does not run: {type(err).__name__}: {err} (step 6 would fail)")
try:
    from gpuprune.cli import main
    text = help_of(lambda: main(["bench", "--help"]))
    need = ["--device", "--data-dir", "--model", "--epochs", "--methods", "--prune-ratios", "--seeds",
            "--out", "--no-plots", "--no-progress", "--no-equal-time", "--train-subset", "resnet18", "mlp", *methods]
    lack = [o for o in need if o not in text]
    say("FAIL" if lack else "PASS", f"gpuprune bench --help lacks {lack}" if lack else
        "gpuprune bench takes every option and method step 7 uses")
except Exception as err:
    say("FAIL", f"gpuprune bench --help failed: {type(err).__name__}: {err}")
PYCHECKS
  local crc=$? kind text
  while IFS=$'\t' read -r kind text; do
    case "$kind" in PASS) pass "$text" ;; WARN) warn "$text" ;; FAIL) fail "$text" ;; esac
  done <"$tmp/checks"
  grep -q -P '^(PASS|WARN|FAIL)\t' "$tmp/checks" || fail "the checks did not run: $(tail -2 "$tmp/checks" | tr '\n' ' ')"
  [ $crc != 0 ] && fail "the checks stopped (exit $crc): $(tail -1 "$tmp/checks")"
  grep -v -P '^(PASS|WARN|FAIL)\t' "$tmp/checks" | tail -3 | sed 's/^/        /'
  # what travels
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    if git check-ignore -q .gpu_check/data && git check-ignore -q "$CARRIED/x.fatbin"; then
      pass "git ignores .gpu_check/: it travels only through carry"
    else fail ".gpu_check/ is not git-ignored (.gitignore)"; fi
    local bytes
    bytes=$( { git ls-files -z --cached --others --exclude-standard; [ -d shared ] && find shared -type f -print0;
               [ -d .gpu_check ] && find .gpu_check -type f -print0; } \
             | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
    local mib; mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
    if awk -v b="$bytes" -v l=$LIMIT_MIB 'BEGIN {exit !(b <= l * 1048576)}'; then
      pass "the tree plus carry is $mib MiB (limit $LIMIT_MIB MiB)"
    else fail "the tree plus carry is $mib MiB, over the $LIMIT_MIB MiB limit"; fi
  else warn "not a git checkout: cannot check what travels"; fi
  if [ $FILES_ONLY = 1 ]; then rm -rf "$tmp"; dry_verdict; return $?; fi
  # the kernel equivalence suite collects, with its cuda backend (step 3) and the others (3b)
  "$PY" -m pytest --collect-only -q -p no:cacheprovider "$EQUIV" tests/test_kernel_keys.py >"$tmp/equiv" 2>&1
  local erc=$? all cuda
  all=$(grep -c '::' "$tmp/equiv"); cuda=$(grep -c '\[cuda' "$tmp/equiv")
  if [ $erc = 0 ] && [ "$cuda" -gt 0 ]; then
    pass "the kernel equivalence suite collects $all tests: $cuda with the cuda backend (step 3, on the GPU), $((all - cuda)) with torch, its device path and the harness (step 3b)"
  else fail "the kernel equivalence suite does not collect with a cuda backend (rc $erc, $cuda cuda tests): $(grep -E '^(ERROR|E ) ' "$tmp/equiv" | head -3 | tr '\n' ' ')"; fi
  # the GPU tests collect
  local files; files=$(grep -l -E "mark\.gpu|pytest\.mark\.gpu" tests/test_*.py 2>/dev/null | tr '\n' ' ')
  if [ -z "$files" ]; then warn "no test file is marked gpu"
  else
    "$PY" -m pytest --collect-only -q -m gpu -p no:cacheprovider $files >"$tmp/collect" 2>&1
    local rc=$? n; n=$(grep -E -o '^[0-9]+(/[0-9]+)? tests? (collected|selected)' "$tmp/collect" | tail -1)
    [ -z "$n" ] && n=$(grep -c '::' "$tmp/collect")
    if [ $rc = 0 ]; then pass "pytest -m gpu collects: $n in $files"
    else warn "pytest -m gpu does not collect cleanly (rc $rc): $(grep -E '^(ERROR|E ) ' "$tmp/collect" | head -3 | tr '\n' ' ')"; fi
  fi
  # the steps' own code, on the CPU
  local w="$tmp/work"; mkdir -p "$w"
  if "$PY" -m gpuprune doctor --device cpu --json "$w/doctor.json" >"$tmp/doctor" 2>&1; then
    pass "gpuprune doctor on the CPU: $(tail -1 "$tmp/doctor")"
  else fail "gpuprune doctor on the CPU: $(tail -1 "$tmp/doctor")"; fi
  if "$PY" scripts/gpu_check_stress.py --dry --seconds 1 --min-selections 50 --json "$w/stress.json" >"$tmp/stress" 2>&1; then
    pass "stress --dry: $(grep '^selections' "$tmp/stress" | cut -c1-100)"
  else fail "stress --dry: $(tail -3 "$tmp/stress" | tr '\n' ' ')"; fi
  if "$PY" benchmarks/selection.py --smoke --sections 1 --json "$w/selection.json" >"$w/selection.log" 2>&1; then
    pass "benchmarks/selection.py --smoke --sections 1: the cost table prints ($(grep -c ' -> ' "$w/selection.log") rows)"
  else warn "benchmarks/selection.py --smoke fails (step 6 would fail): $(tail -2 "$w/selection.log" | tr '\n' ' ')"; fi
  if "$PY" scripts/gpu_check_sync.py --dry --json "$w/sync.json" >"$tmp/sync" 2>&1; then pass "sync --dry runs"
  else fail "sync --dry: $(tail -2 "$tmp/sync" | tr '\n' ' ')"; fi
  printf '2\tgpuprune doctor (dry, cpu)\tok\t0\t0\t0\n4\tstress (dry, cpu)\tok\t0\t0\t0\n5\tsyncs (dry, cpu)\tok\t0\t0\t0\n' >"$w/steps.tsv"
  if "$PY" scripts/gpu_check_report.py --work "$w" --out "$tmp/out" >"$tmp/report" 2>&1 && [ -s "$tmp/out/gpu_report.md" ]; then
    pass "the report builds from the dry figures ($(wc -l <"$tmp/out/gpu_report.md") lines)"
  else fail "gpu_check_report.py: $(tail -2 "$tmp/report" | tr '\n' ' ')"; fi
  rm -rf "$tmp"
  dry_verdict
}

dry_verdict() {
  echo
  echo "GPU steps of the call (budget $BUDGET s, timeout_s $TIMEOUT_S):"
  list_steps "$BUDGET" "${GPU_STEPS[@]}"
  echo "GPU steps of --quick (budget $QUICK_BUDGET s, timeout_s $QUICK_TIMEOUT_S):"
  list_steps "$QUICK_BUDGET" "${QUICK_STEPS[@]}"
  echo "device call (the run tool's arguments; docs/gpu_check.md):"
  echo "  $(device_call)"
  echo "quick variant (under 2 minutes of device time with the machine's start):"
  echo "  $(device_call --quick)"
  echo "rerun of failed steps, e.g. 4 and 5 (then 8 for the report), on a fresh machine:"
  echo "  $(device_call 4,5,8 90)"
  if [ $NFAIL -gt 0 ]; then echo "gpu_check --dry-run: FAIL ($NFAIL failed, $NWARN warnings)"; return 1; fi
  echo "gpu_check --dry-run: OK ($NWARN warnings$([ $NWARN -gt 0 ] && echo ': run --prepare, then --dry-run --strict before the call'))"
  return 0
}

# ------------------------------------------------------------------------------------ GPU run
WORK="" START=0 NBAD=0
selected() {
  [ "$STEPS" = all ] && return 0
  local s; for s in ${STEPS//,/ }; do { [ "$s" = "$1" ] || [ "$s" = "${1%[a-z]}" ]; } && return 0; done
  return 1
}

step() {   # step NUM NAME CAP_SECONDS command...
  local num=$1 name=$2 cap=$3; shift 3
  selected "$num" || return 0
  local left=$(( START + BUDGET - RESERVE - $(date +%s) )) limit=$cap
  [ $left -lt $limit ] && limit=$left
  if [ $limit -lt 10 ]; then
    printf '%s\t%s\tskipped (budget)\t\t0\t%s\n' "$num" "$name" "$limit" >>"$WORK/steps.tsv"
    echo "=== [$num] $name: SKIPPED, the budget is spent" | tee -a "$LOG"; NBAD=$((NBAD + 1)); return 0
  fi
  echo "=== [$num] $name (limit ${limit} s): $*" | tee -a "$LOG"
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/step$num.log" >>"$LOG"
  local rc=${PIPESTATUS[0]} status=ok
  [ $rc != 0 ] && status=failed && NBAD=$((NBAD + 1))
  [ $rc = 124 ] || [ $rc = 137 ] && status="timed out"
  local dt=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$num" "$name" "$status" "$rc" "$dt" "$limit" >>"$WORK/steps.tsv"
  echo "=== [$num] $name: $status (exit $rc, ${dt} s)" | tee -a "$LOG"
  tail -4 "$WORK/step$num.log" | sed 's/^/    /'
}

cap_of() {   # cap_of NUM: the cap of a step in the table in use
  local row num cap what
  for row in "${TABLE[@]}"; do IFS='|' read -r num cap what <<<"$row"; [ "$num" = "$1" ] && { echo "$cap"; return; }; done
  echo 30
}

gpu_run() {
  mkdir -p "$OUT_DIR" || exit 1
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
  LOG="$OUT_DIR/gpu_check.log"; : >"$LOG"; : >"$WORK/steps.tsv"
  START=$(date +%s)
  if [ $QUICK = 1 ]; then TABLE=("${QUICK_STEPS[@]}"); else TABLE=("${GPU_STEPS[@]}"); fi
  echo "gpu_check$([ $QUICK = 1 ] && echo ' --quick'): $(date -u '+%F %T UTC'), budget $BUDGET s, steps $STEPS, results in $OUT_DIR" | tee -a "$LOG"
  # the carried fatbin goes where the loader looks; it takes it only if it was built from this
  # tree's source (its name holds the source's hash), else NVRTC compiles the source
  if [ "${GPU_CHECK_FORCE_RUN:-0}" != 1 ] && ls "$CARRIED"/*.fatbin >/dev/null 2>&1; then
    cp -f "$CARRIED"/*.fatbin gpuprune/kernels/ && echo "fatbin: $(cd "$CARRIED" && ls *.fatbin) -> gpuprune/kernels/" | tee -a "$LOG"
  else echo "fatbin: none carried (or a forced run): the NVRTC build only" | tee -a "$LOG"; fi
  step 1 "environment" "$(cap_of 1)" "$PY" scripts/gpu_check_env.py --json "$WORK/env.json" --kernels-env "$WORK/kernels_env"
  if [ -s "$WORK/kernels_env" ]; then       # the fatbin does not load: everything after uses NVRTC
    export GPUPRUNE_KERNELS=$(cat "$WORK/kernels_env")
    echo "the fatbin does not load here: GPUPRUNE_KERNELS=$GPUPRUNE_KERNELS for the next steps" | tee -a "$LOG"
  fi
  step 2 "gpuprune doctor" "$(cap_of 2)" "$PY" -m gpuprune doctor --device cuda --require-kernels --json "$WORK/doctor.json"
  step 3 "kernel equivalence suite, cuda backend" "$(cap_of 3)" "$PY" -m pytest -q -p no:cacheprovider \
    "$EQUIV" -k cuda --junitxml="$WORK/pytest_equiv_cuda.xml"
  if [ $QUICK = 0 ]; then
    step 3b "kernel equivalence suite, other backends" "$(cap_of 3b)" "$PY" -m pytest -q -p no:cacheprovider \
      "$EQUIV" tests/test_kernel_keys.py -k "not cuda" --junitxml="$WORK/pytest_equiv_other.xml"
    step 3g "pytest -m gpu (other files)" "$(cap_of 3g)" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
      --continue-on-collection-errors --ignore="$EQUIV" --junitxml="$WORK/pytest.xml" tests
  fi
  step 4 "stress: kernels vs torch" "$(cap_of 4)" "$PY" scripts/gpu_check_stress.py --device cuda --seconds 6 \
    --min-selections 200 --mutant threadfence --mutant-seconds 5 --json "$WORK/stress.json"
  local quick_sync=(); [ $QUICK = 1 ] && quick_sync=(--quick)
  step 5 "host syncs, counted" "$(cap_of 5)" "$PY" scripts/gpu_check_sync.py "${quick_sync[@]}" --json "$WORK/sync.json"
  step 6 "benchmarks/selection.py --device cuda" "$(cap_of 6)" "$PY" benchmarks/selection.py --device cuda \
    --sizes 1e6 1e8 --repeats 10 --json "$WORK/selection.json"
  [ -f "$WORK/step6.log" ] && cp "$WORK/step6.log" "$WORK/selection.log"
  if [ "$STEPS" != all ] && [ $QUICK = 0 ]; then   # the end-to-end runs: only when asked (--steps 7)
    local common=(--device cuda --data-dir "$DATA" --methods "${METHODS[@]}" --prune-ratios 0.5 --seeds 0
                  --no-plots --no-progress --no-equal-time)   # the ladder's extra runs would not fit
    "$PY" -m gpuprune bench --help 2>/dev/null | grep -q -- '--cifar-shaped' && common+=(--cifar-shaped)
    step 7a "bench MLP, 10 epochs" 75 "$PY" -m gpuprune bench "${common[@]}" --model mlp --epochs 10 --out "$WORK/bench_mlp"
    step 7b "bench ResNet-18, 4 epochs, 30k images" 120 "$PY" -m gpuprune bench "${common[@]}" --model resnet18 \
      --epochs 4 --train-subset 30000 --out "$WORK/bench_resnet18"
  fi
  RESERVE=0
  step 8 "report" "$(cap_of 8)" "$PY" scripts/gpu_check_report.py --work "$WORK" --out "$OUT_DIR"
  tar -czf "$OUT_DIR/gpu_check_logs.tar.gz" -C "$WORK" . 2>/dev/null
  echo
  cat "$OUT_DIR/gpu_report.md" 2>/dev/null
  local total=$(( $(date +%s) - START ))
  echo "gpu_check: $( [ $NBAD = 0 ] && echo OK || echo "FAIL: $NBAD step(s) failed or were skipped" ) in ${total} s; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
  rm -rf "$WORK"
  [ $NBAD = 0 ]
}

case "$MODE" in
  prepare) prepare; exit $? ;;
  dry) dry_run; exit $? ;;
esac
# GPU_CHECK_FORCE_RUN=1 runs the GPU steps on a machine without a GPU (they fail fast): this tests
# the script's own plumbing (time boxes, step table, report, archive) without device time
if [ "${GPU_CHECK_FORCE_RUN:-0}" = 1 ] || "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpu_run; exit $?
fi
echo "gpu_check: torch sees no CUDA GPU here: running the dry run (--dry-run) instead"
dry_run
