#!/usr/bin/env bash
# The CIFAR-shaped GPU study of issue 23: Fashion-MNIST zero-padded to 3x32x32, ResNet-18 with
# random crops and flips, OneCycle, label smoothing 0.1, 30 epochs, every method at p = 0.5
# (`gpuprune bench --preset gpu-study`: 10,000 training / 5,000 test images, seeds 0 and 1, bf16,
# channels-last), with the equal-time ladder; it prints the same tables as `gpuprune bench`.
#
#   bash scripts/gpu_study.sh --prepare   # here, before the call: the data into .data/ (carried)
#   bash scripts/gpu_study.sh --dry-run   # here or in CI: the H100 estimate, then the same code
#                                         # path shrunk to seconds on the CPU
#   bash scripts/gpu_study.sh             # on the GPU machine: the study (fits 8 min of an H100)
#   bash scripts/gpu_study.sh --seeds 0   # extra arguments go to gpuprune bench (here: 1 seed)
#
# Device call (after --prepare): {"command": "bash scripts/gpu_study.sh", "carry": [".data"],
# "timeout_s": 540}. Results: $OUT (default ./gpu_study_out): table.txt (the printed result) and
# gpu_study.tar.gz (results.json, the CSVs, the plots). The bench projects the study's length from
# its own warm-up and stops (exit status 3) before training if that is over 450 s.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SRC=${FMNIST_SRC:-/usr/share/datasets/fashion-mnist}
DATA=$ROOT/.data/fashion-mnist
OUT_DIR=${OUT:-$ROOT/gpu_study_out}
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz
       t10k-labels-idx1-ubyte.gz)

MODE=run
case "${1:-}" in
  --prepare) MODE=prepare; shift ;;
  --dry-run) MODE=dry; shift ;;
  -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

data_args() {          # the carried copy on the GPU machine, else the Debian package's folder
  if [ -f "$DATA/${FILES[0]}" ]; then echo "--data-dir $DATA"; fi
}

case "$MODE" in
  prepare)
    mkdir -p "$DATA"
    for f in "${FILES[@]}"; do
      [ -f "$SRC/$f" ] || { echo "gpu_study: $SRC/$f is missing (install dataset-fashion-mnist)" >&2; exit 2; }
      cp -f "$SRC/$f" "$DATA/"
    done
    echo "gpu_study: $(du -sh "$DATA" | cut -f1) of Fashion-MNIST in $DATA (git-ignored; carry .data)"
    echo '{"command": "bash scripts/gpu_study.sh", "carry": [".data"], "timeout_s": 540}'
    ;;
  dry)
    est=$("$PY" scripts/gpu_study_estimate.py)
    echo "$est" | grep -v '^RATES'
    read -r _ train fwd <<<"$(echo "$est" | grep '^RATES')"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    # shellcheck disable=SC2046
    "$PY" -m gpuprune bench --preset gpu-study --dry-run --no-progress --assume-rates "$train" "$fwd" \
      $(data_args) --out "$tmp" "$@"
    echo "gpu_study: dry run OK"
    ;;
  run)
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
      echo "gpu_study: no CUDA GPU here; use --dry-run" >&2; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    work=$(mktemp -d)
    mkdir -p "$OUT_DIR"
    start=$(date +%s)
    status=0
    # shellcheck disable=SC2046
    "$PY" -m gpuprune bench --preset gpu-study --no-progress $(data_args) --out "$work/results" "$@" \
      2>&1 | tee "$OUT_DIR/table.txt" || status=$?
    tar -czf "$OUT_DIR/gpu_study.tar.gz" -C "$work" . 2>/dev/null || true
    rm -rf "$work"
    echo "gpu_study: exit status $status in $(( $(date +%s) - start )) s; files in $OUT_DIR"
    exit "$status"
    ;;
esac
