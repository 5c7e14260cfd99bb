#!/usr/bin/env bash
# `make box-test`: the box up, then through the normal commands on it
#   1. a 2-host TorchX Slurm job (one rank per worker host, gloo over the bridge, the item table row-wise
#      across the hosts, FSDP2 over the blocks); `torchx status` / `torchx log` on it; its per-step losses
#      equal the same job's with 2 ranks on one host (local_cwd);
#   2. `fuxi data build-sequences` + `append-day` on the Ray cluster equal the same commands on a local Ray,
#      also written to the box's object store (s3://box on SeaweedFS);
#   3. a lost worker host mid-job (every process in its namespace, slurmd included; back 20 s later):
#      Slurm requeues, the job resumes from its last complete checkpoint in the same MLflow run, and its
#      losses equal the uninterrupted job's;
#   4. `fuxi nightly --scheduler slurm` for 2 dates with its workdir on s3://box (logs, sequences built on
#      the Ray cluster, run dirs and checkpoints written by the Slurm job's rank, the registered versions'
#      copies) and the experiment's MLflow artifacts there too: both dates succeed, date 2 warm-starts
#      from date 1's version, `champion` moves per the promotion rule, a re-run of date 2 skips every step,
#      and nothing new under runs/ outside the box's own state (infra/box/nightly_checks.py);
# and the box down (also on failure). Each check fails with one line. Needs root.
# BOX_TEST_STEPS (default "1 2 3 4") picks the checks; the drill (3) compares against step 1's job.
set -euo pipefail
cd "$(dirname "$0")/../.."
BOX=infra/box/box.sh
on() { "$BOX" exec "$@"; }
step() { echo "== box-test: $*" >&2; }
fail() { echo "box-test FAILED: $*" >&2; exit 1; }

# the box needs root and network namespaces; a machine without them says so in one line (CI: CI_SKIP_BOX=1)
[ "$(id -u)" -eq 0 ] || fail "needs root (network namespaces, Debian packages); CI_SKIP_BOX=1 skips it in .ci/run"
ip netns list >/dev/null 2>&1 || fail "'ip netns' does not work here; CI_SKIP_BOX=1 skips it in .ci/run"
infra/box/install.sh
[ "${BOX_KEEP:-0}" = 1 ] || trap '"$BOX" down' EXIT  # also when box up fails half-way
"$BOX" up
on head scancel --full --user root  # jobs left queued by an earlier run (Slurm's state outlives box down)

ID=bt$(date +%s)               # job and data names of this run: a rerun never resumes an earlier one
EPOCHS=${BOX_TEST_EPOCHS:-12}  # tiny: 2 steps an epoch, a checkpoint at each epoch's end
JOB_ARGS=(--preset tiny --epochs "$EPOCHS" parallel.sharding_types=row_wise tracking.log_every_steps=1)
OUT=runs/box-test/$ID
mkdir -p "$OUT"

step "0. Ray on the bridge: node addresses 10.77.0.x, no other address in any host"
# Ray's GCS and raylets listen on the wildcard address (Ray has no setting for theirs; the workers and
# agents bind the node IP): what bounds them is the namespace, whose only addresses are loopback, the
# bridge address and its link-local IPv6. `ss -ltnp` per host goes to the log.
for h in head w1 w2; do
  other=$(ip -n "fuxibox-$h" -o addr show | awk '{print $4}' | grep -Ev '^(127\.0\.0\.1/8|::1/128|10\.77\.0\.[0-9]+/24|fe80:.*)$' || true)
  [ -z "$other" ] || fail "host $h has an address off the bridge: $other"
  ip netns exec "fuxibox-$h" ss -ltnp > "$OUT/listeners-$h.txt"
done
nodes=$(on head python -c "import ray; ray.init(logging_level='ERROR')
print(' '.join(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))" | tail -1)
[ "$nodes" = "10.77.0.10 10.77.0.11 10.77.0.12" ] || fail "Ray node addresses '$nodes', not the bridge's"
echo "Ray nodes on $nodes; each host's addresses: loopback and its bridge address only" >&2

STEPS=" ${BOX_TEST_STEPS:-1 2 3 4} "
want() { [[ $STEPS == *" $1 "* ]]; }

# latest_step RUN_DIR: the step the run's `latest` pointer names (0: none yet). The pointer is committed
# only after its checkpoint is complete (pipeline/train/checkpoint.py); read through the storage layer,
# which imports no torch, so polling it stays cheap.
latest_step() {
  on head python -c "import sys, storage
p = storage.CommitRoot(sys.argv[1] + '/checkpoints').read('latest')
print(p.meta.get('step', 0) if p else 0)" "$1" 2>/dev/null || echo 0
}

# submit NAME ARGS...: a 2-host Slurm job; prints its app handle
submit() {
  local name=$1
  shift
  on head torchx run -s slurm jobs/components.py:train --nnodes 2 --nproc_per_node 1 --name "$name" \
    --run_dir "runs/$name" "$@" "${JOB_ARGS[@]}" 2>&1 | tee "$OUT/$name.submit.log" | grep -o 'slurm://[^ ]*' | tail -1
}

# wait_done HANDLE SECONDS: poll `torchx status` until the job ends; fail unless it SUCCEEDED
wait_done() {
  local handle=$1 secs=$2 state=
  for _ in $(seq 1 $((secs / 3))); do
    state=$(on head torchx status "$handle" 2>/dev/null | awk '/State:/ && !s {s = $2} END {print s}' || true)
    case "$state" in
      SUCCEEDED) return 0 ;;
      FAILED | CANCELLED) fail "$handle ended $state (torchx log $handle; logs in slurm-${handle##*/}-*.out)" ;;
    esac
    sleep 3
  done
  fail "$handle not done in ${secs}s (last state: ${state:-none})"
}

if want 1 || want 3; then
step "1. 2-host training on Slurm"
H=$(submit "$ID-2host") || true
[ -n "$H" ] || fail "torchx run -s slurm did not print an app handle ($OUT/$ID-2host.submit.log)"
wait_done "$H" 300
JOBID=${H##*/}
nodes=$(on head sacct -n -X -j "$JOBID" -o NodeList%20 | tr -s ' \n' ' ')
case "$nodes" in *w1*w2* | *w2*w1*) ;; *) fail "job $JOBID ran on '$nodes', not on w1 and w2" ;; esac
on head torchx log --streams stdout "$H" > "$OUT/$ID-2host.log" 2>&1 || fail "torchx log $H failed"
grep -q "mlflow run:" "$OUT/$ID-2host.log" || fail "torchx log $H has no training output"
on head python - "runs/$ID-2host" <<'EOF' || fail "2-host job: not 2 ranks with the item table row-wise"
import sys
from pipeline.train.checkpoint import read_meta, resolve_checkpoint
t = read_meta(resolve_checkpoint(f"{sys.argv[1]}/checkpoints/final"))
ranks = sorted(s["rank"] for s in t["sharding"]["shards"])
assert t["world_size"] == 2 and t["sharding"]["sharding_type"] == "row_wise" and ranks == [0, 1], t["sharding"]
print(f"2-host job: world size 2, item table row-wise: {t['sharding']['shards']}")
EOF
echo "job $JOBID on $nodes: $(on head torchx status "$H" | awk '/State:/ {print $2}')" >&2
fi

if want 1; then
step "1b. the same job with 2 ranks on one host (local_cwd on w1)"
on w1 torchx run -s local_cwd jobs/components.py:train --nproc_per_node 2 --name "$ID-1host" \
  --run_dir "runs/$ID-1host" "${JOB_ARGS[@]}" > "$OUT/$ID-1host.log" 2>&1 || fail "local 2-rank job failed ($OUT/$ID-1host.log)"
on head python infra/box/compare_losses.py "runs/$ID-2host" "runs/$ID-1host" | tail -1 \
  || fail "2-host losses differ from 1-host 2-rank losses"
fi

if want 2; then
step "2. sequence build on the Ray cluster vs a local Ray"
D=runs/box-test/$ID/data
on head fuxi data synth-logs --out "$D/logs" --users 300 --items 200 --days 3 --events 6000 >/dev/null 2>&1 \
  || fail "fuxi data synth-logs failed"
RAY_HEAD=$(on head printenv RAY_ADDRESS)
for where in ray local; do
  # no RAY_ADDRESS in either: the cluster is named by --ray-address; without it, a local Ray inside the head
  join=()
  [ "$where" = ray ] && join=(--ray-address "$RAY_HEAD")
  on head env -u RAY_ADDRESS fuxi data build-sequences --logs "$D/logs" --out "$D/seq-$where" --partitions 4 \
    --dates 2024-01-01,2024-01-02 "${join[@]}" > "$OUT/build-$where.log" 2>&1 || fail "build-sequences ($where) failed ($OUT/build-$where.log)"
  on head env -u RAY_ADDRESS fuxi data append-day --logs "$D/logs" --date 2024-01-03 --sequences "$D/seq-$where" \
    "${join[@]}" > "$OUT/append-$where.log" 2>&1 || fail "append-day ($where) failed ($OUT/append-$where.log)"
done
for f in build append; do
  grep -q "Connecting to existing Ray cluster at address: $RAY_HEAD" "$OUT/$f-ray.log" \
    || fail "$f with --ray-address $RAY_HEAD did not join the box's Ray cluster ($OUT/$f-ray.log)"
done
on head python infra/box/compare_sequences.py "$D/seq-ray" "$D/seq-local" || fail "Ray-cluster build differs from the local build"
# the same build on the Ray cluster, written to the box's object store (SeaweedFS: volumes on w1 and w2)
S3=s3://box/box-test/$ID/seq
on head env -u RAY_ADDRESS fuxi data build-sequences --logs "$D/logs" --out "$S3" --partitions 4 \
  --dates 2024-01-01,2024-01-02 --ray-address "$RAY_HEAD" > "$OUT/build-s3.log" 2>&1 || fail "build-sequences to $S3 failed ($OUT/build-s3.log)"
on head env -u RAY_ADDRESS fuxi data append-day --logs "$D/logs" --date 2024-01-03 --sequences "$S3" \
  --ray-address "$RAY_HEAD" > "$OUT/append-s3.log" 2>&1 || fail "append-day on $S3 failed ($OUT/append-s3.log)"
on head python infra/box/compare_sequences.py "$S3" "$D/seq-local" || fail "the build on S3 differs from the local build"
fi

if want 3; then
step "3. drill: lose worker host w2 mid-job"
t0=$(date +%s)
H=$(submit "$ID-drill" --max_retries 1) || true
[ -n "$H" ] || fail "drill job not submitted ($OUT/$ID-drill.submit.log)"
at=0
for _ in $(seq 1 60); do  # wait for a complete checkpoint past the first epoch (2 steps), then pull the plug
  at=$(latest_step "runs/$ID-drill")
  [ "$at" -gt 2 ] && break
  sleep 2
done
[ "$at" -gt 2 ] || fail "drill job wrote no checkpoint past step 2 in 120 s"
run_before=$(python3 -c "import json; print(json.load(open('runs/$ID-drill/mlflow_run.json'))['run_id'])")
echo "killing w2 at $(date +%T), checkpoint step $at ($(($(date +%s) - t0)) s after submit)" >&2
"$BOX" kill-host w2
sleep 20
"$BOX" start-host w2
wait_done "$H" 480
on head sacct -D -X -j "${H##*/}" -o JobID%12,State,Start,End,NodeList > "$OUT/$ID-drill.sacct" || true
# every attempt is a record of its own in the accounting (-D): the requeued ones end REQUEUED
requeues=$(on head sacct -n -D -X -j "${H##*/}" -o JobID%20,State | awk '$1 ~ /\+0$/ && $2 == "REQUEUED"' | wc -l)
[ "$requeues" -ge 1 ] || fail "drill: job ${H##*/} finished without a requeue (was w2 lost?)"
run_after=$(python3 -c "import json; print(json.load(open('runs/$ID-drill/mlflow_run.json'))['run_id'])")
[ "$run_before" = "$run_after" ] || fail "drill: the retry opened a new MLflow run ($run_before -> $run_after)"
resumed=$(on head python -c "import sys; from mlflow.tracking import MlflowClient
print(MlflowClient().get_run(sys.argv[1]).data.tags.get('resumed_from', 'nothing'))" "$run_after")
on head python infra/box/compare_losses.py "runs/$ID-drill" "runs/$ID-2host" | tail -1 \
  || fail "drill: losses differ from the uninterrupted job"
echo "drill: job ${H##*/}: killed at step $at, Slurm requeues $requeues, resumed from $resumed," \
  "one MLflow run $run_after, $(($(date +%s) - t0)) s from submit to SUCCEEDED" >&2
fi

if want 4; then
step "4. nightly retraining, 2 dates, everything on s3://box"
# the workdir (state, logs, sequences, run dirs, checkpoints, version copies) and the experiment's MLflow
# artifacts on the object store; a model name of this run's own, so date 1 starts with no champion
W=s3://box/box-test/$ID/nightly
MODEL=fuxi-box-$ID
NIGHTLY=(fuxi nightly --scheduler slurm --workdir "$W" --name "$MODEL" --experiment "$MODEL" --set epochs=2)
on head python -c "import sys; from mlflow.tracking import MlflowClient
MlflowClient().create_experiment(sys.argv[1], artifact_location=sys.argv[2])" "$MODEL" "s3://box/box-test/$ID/mlflow" \
  > "$OUT/nightly-experiment.log" 2>&1 || fail "nightly: experiment $MODEL not created ($OUT/nightly-experiment.log)"
# what exists under runs/ outside the box's own state and this test's logs, before the run
local_files() { find runs -path runs/box -prune -o -path "$OUT" -prune -o -type f -print | sort; }
local_files > "$OUT/nightly-local-before.txt"
t0=$(date +%s)
prev=
for d in 2024-01-01 2024-01-02; do
  on head "${NIGHTLY[@]}" --date "$d" > "$OUT/nightly-$d.log" 2>&1 || fail "nightly $d failed ($OUT/nightly-$d.log)"
  msg=$(on head python infra/box/nightly_checks.py date "$W" "$MODEL" "$d" ${prev:+"$prev"} 2>&1 | tail -1) \
    || fail "nightly $msg"
  echo "nightly $msg" >&2
  # the sequence step joined the box's Ray cluster (RAY_ADDRESS), the train step ran on a worker host
  grep -q "Connecting to existing Ray cluster at address: $(on head printenv RAY_ADDRESS)" "$OUT/nightly-$d.log" \
    || fail "nightly $d: the sequence step did not run on the Ray cluster ($OUT/nightly-$d.log)"
  job=$(grep -o 'submitted nightly-[^ ]*: slurm://[^ ]*' "$OUT/nightly-$d.log" | tail -1 | sed 's|.*/||')
  node=$(on head sacct -n -X -j "${job:-0}" -o NodeList%20 | tr -d ' \n')
  [[ $node == w[0-9]* ]] || fail "nightly $d: train job '${job}' ran on '$node', not on a worker host"
  prev=$d
done
t1=$(date +%s)
before=$(on head python infra/box/nightly_checks.py facts "$MODEL" | tail -1)
on head "${NIGHTLY[@]}" --date 2024-01-02 > "$OUT/nightly-rerun.log" 2>&1 || fail "nightly re-run of 2024-01-02 failed ($OUT/nightly-rerun.log)"
skipped=$(grep -c 'done earlier, skipped' "$OUT/nightly-rerun.log" || true)
[ "$skipped" -eq 5 ] || fail "nightly re-run of 2024-01-02 skipped $skipped of 5 steps ($OUT/nightly-rerun.log)"
after=$(on head python infra/box/nightly_checks.py facts "$MODEL" | tail -1)
[ "$before" = "$after" ] || fail "nightly re-run changed the registry: $before -> $after"
! grep -q 'submitted nightly-' "$OUT/nightly-rerun.log" || fail "nightly re-run of 2024-01-02 submitted a training job"
# on local disk only what is local by nature: Slurm's job output in the submitting directory (slurm-*.out,
# read by `torchx log`), each host's /tmp (Ray's session, torchelastic's files; runs/box/hosts/<h>/tmp)
local_files | comm -13 "$OUT/nightly-local-before.txt" - > "$OUT/nightly-local-new.txt"
[ ! -s "$OUT/nightly-local-new.txt" ] \
  || fail "nightly wrote under runs/: $(head -1 "$OUT/nightly-local-new.txt") ($(wc -l < "$OUT/nightly-local-new.txt") files, $OUT/nightly-local-new.txt)"
echo "nightly: 2 dates in $((t1 - t0)) s, re-run skipped all 5 steps in $(($(date +%s) - t1)) s; $after;" \
  "nothing under runs/ outside runs/box" >&2
fi

step "passed"
