#!/usr/bin/env bash
# Runs the demo four ways with otherwise equal settings, then writes
# docs/demo_table.md and docs/demo_recall.png:
#   routed          the default: owners side by side, each LoRA kept apart, questions routed
#   exact           cyclic rounds (owners one after another), exact aggregation
#   exact-parallel  exact aggregation of the owners' updates trained side by side (FedAvg's round)
#   fedit           the FedIT baseline: parallel rounds, A and B averaged separately
# About an hour on a 2-core CPU.   Usage: scripts/demo_benchmark.sh [extra simulate args]
set -euo pipefail
cd "$(dirname "$0")/.."
FEDMEM="${FEDMEM:-.venv/bin/fedmem}"
run() {
  local name="$1"; shift
  local out="runs/bench-$name"
  local start; start=$(date +%s.%N)
  "$FEDMEM" simulate --out "$out" "$@" || true
  [ -f "$out/summary.json" ] || { echo "run $name failed" >&2; exit 1; }
  echo "$(date +%s.%N) - $start" | bc > "$out/wall_seconds.txt"
}
run routed "$@"
run exact --schedule cyclic "$@"
run exact-parallel --schedule parallel "$@"
run fedit --set method=fedit --schedule parallel "$@"
.venv/bin/python scripts/demo_report.py routed=runs/bench-routed exact=runs/bench-exact exact-parallel=runs/bench-exact-parallel \
  fedit=runs/bench-fedit --plot docs/demo_recall.png --table docs/demo_table.md
