#!/usr/bin/env bash
# Runs the demo with the exact aggregation and with the FedIT baseline (same settings
# otherwise), then writes docs/demo_table.md and docs/demo_recall.png.
# About 20 minutes on a 2-core CPU.   Usage: scripts/demo_benchmark.sh [extra simulate args]
set -euo pipefail
cd "$(dirname "$0")/.."
FEDMEM="${FEDMEM:-.venv/bin/fedmem}"
for method in exact fedit; do
  out="runs/bench-$method"
  start=$(date +%s.%N)
  "$FEDMEM" simulate --method "$method" --out "$out" "$@" || true
  [ -f "$out/summary.json" ] || { echo "run $method failed" >&2; exit 1; }
  echo "$(date +%s.%N) - $start" | bc > "$out/wall_seconds.txt"
done
.venv/bin/python scripts/demo_report.py exact=runs/bench-exact fedit=runs/bench-fedit \
  --plot docs/demo_recall.png --table docs/demo_table.md
