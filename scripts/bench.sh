#!/usr/bin/env bash
# Set up from nothing, then run the main job: `gpuprune bench` on real data (CPU default, ~5 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec gpuprune bench "$@"
