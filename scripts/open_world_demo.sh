#!/usr/bin/env bash
# The nightly job on an open world, as an operator runs it: synthetic logs with hashed 64-bit item ids and
# new items every day, then `fuxi nightly` for each date (the first bootstraps; every later one extends the
# vocabulary and sequences, grows the table, warm-starts from the champion and scores candidate and champion
# on the date's events), then `fuxi report --nightly` (per-date table + plot).
#   scripts/open_world_demo.sh [WORKDIR] [REPORT_DIR]   (defaults: a fresh temporary folder, WORKDIR/report)
# docs/nightly_report.{md,png} come from `scripts/open_world_demo.sh runs/open-world docs`.
set -euo pipefail
cd "$(dirname "$0")/.."
FUXI=${FUXI:-.venv/bin/fuxi}
WORK=${1:-$(mktemp -d -t fuxi-open-world-XXXXXX)}
REPORT=${2:-$WORK/report}
mkdir -p "$WORK"
export MLFLOW_TRACKING_URI="sqlite:///$(cd "$WORK" && pwd)/mlflow.db"
DATES="2024-01-01 2024-01-02 2024-01-03 2024-01-04 2024-01-05 2024-01-06"
"$FUXI" data synth-logs --out "$WORK/logs" --users 300 --items 200 --days 6 --events 24000 \
  --new-items-per-day 15 --item-ids hashed --seed 0 --overwrite
for d in $DATES; do
  "$FUXI" nightly --date "$d" --workdir "$WORK/nightly" --logs "$WORK/logs" --no-demo-data \
    --preset tiny --set epochs=4 --set optim.lr=0.005
done
"$FUXI" report --nightly --out "$REPORT"
