#!/usr/bin/env bash
# Run several teacher_curve.py configurations side by side (one process each, each limited to
# ${T:-500} s); a summary of all curves goes to ${OUT:-runs/sweep}/summary.txt.
# Usage: benchmarks/sweep.sh NAME "overrides..." [NAME "overrides..."]...
out=${OUT:-runs/sweep}; logs=runs/sweep/logs; mkdir -p "$out" "$logs"
while [ $# -gt 1 ]; do
  name=$1; ov=$2; shift 2
  timeout "${T:-500}" python benchmarks/teacher_curve.py configs/tiny.yaml run.dir=runs/sweep/${name%%+*} $ov \
    > "$logs/$name.log" 2>&1 &
done
wait
for f in "$logs"/*.log; do echo "== $f"; grep '^{' "$f" | tail -30; grep -i error "$f" | tail -3; done \
  | tee -a "$out/summary.txt"
