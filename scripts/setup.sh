#!/usr/bin/env bash
# One-time set-up on a fresh machine: the package with its test/bench/DALI extras, and the
# Fashion-MNIST files from Debian when we are root. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "[setup] could not install dataset-fashion-mnist; the benchmark will fall back to scikit-learn digits"
fi
echo "[setup] installing gpuprune and its extras (torch pinned by constraints.txt)"
$PY -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[cuda12,test,bench,kernel-tests]"
