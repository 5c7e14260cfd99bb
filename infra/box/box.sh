#!/usr/bin/env bash
# A cluster in a box: N hosts on one machine, each a Linux network namespace with its own address on one
# bridge, its own hostname and /tmp, sharing the filesystem (the repository and everything under it, like
# an NFS mount). infra/box/README.md says what runs where.
#
#   infra/box/box.sh up                  start everything; a no-op when the box is up and healthy
#   infra/box/box.sh down                stop every process of the box, remove its namespaces and bridge
#   infra/box/box.sh status              one line per service: ready or not
#   infra/box/box.sh exec HOST CMD...    run CMD on HOST (head, w1, w2) in the repo root with the box env
#   infra/box/box.sh env                 the client environment (SLURM_CONF, MLFLOW_TRACKING_URI, ...)
#   infra/box/box.sh kill-host HOST      SIGKILL every process on HOST (slurmd and Ray included): a lost host
#   infra/box/box.sh start-host HOST     bring a lost worker host back (its slurmd and Ray worker)
#   infra/box/box.sh restart mlflow [S]  stop the tracking server, start it again S seconds later
#
# Env: BOX_DIR (state: configs, data, logs; default <repo>/runs/box), BOX_WORKERS (2), BOX_SUBNET (10.77.0:
# the /24 used only inside the box's namespaces; nothing is routed out of it). Needs root and the packages
# of infra/box/install.sh.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BOX_DIR=${BOX_DIR:-$REPO/runs/box}
WORKERS=${BOX_WORKERS:-2}
SUBNET=${BOX_SUBNET:-10.77.0}
VENV=${VENV:-$REPO/.venv}
PREFIX=fuxibox                    # namespace names: fuxibox-net (the bridge), fuxibox-head, fuxibox-w1, ...
CLUSTER=fuxibox                   # Slurm cluster name
HEAD_IP=$SUBNET.10
MLFLOW_PORT=5000
RAY_PORT=6379
PG_PORT=5432
MYSQL_PORT=3306
WEED_MASTER_PORT=9333             # SeaweedFS: master on the head, a volume server per worker, filer + S3 on
WEED_VOLUME_PORT=8080             # the head; each also serves gRPC on its port + 10000
WEED_FILER_PORT=8888
S3_PORT=8333
S3_BUCKET=box

hosts() { echo head; for i in $(seq 1 "$WORKERS"); do echo "w$i"; done; }
workers() { for i in $(seq 1 "$WORKERS"); do echo "w$i"; done; }
host_ip() { if [ "$1" = head ]; then echo "$HEAD_IP"; else echo "$SUBNET.$((10 + ${1#w}))"; fi; }

LOG=$BOX_DIR/log
ETC=$BOX_DIR/etc
say() { echo "box: $*" >&2; }
die() { echo "box: $*" >&2; exit 1; }

# --- hosts -------------------------------------------------------------------------------------------------
# A host is a network namespace plus an anchor process holding its own UTS (hostname) and mount namespace
# (/etc/hosts, /etc/resolv.conf, /tmp and /run/munge bind-mounted from the box dir: one munged serves every
# host through its socket, as one munged per host with the same key would). Every process of the host is
# started inside the anchor's namespaces, so `hostname` and name resolution behave as on a real host.

anchor_pid() { cat "$BOX_DIR/hosts/$1/anchor.pid" 2>/dev/null; }

host_alive() {
  local pid
  pid=$(anchor_pid "$1") || return 1
  [ -n "$pid" ] && [ -e "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = sleep ]
}

# on HOST CMD...: run CMD in HOST's namespaces with the box environment, in the repo root
on() {
  local h=$1
  shift
  host_alive "$h" || die "host $h is not up"
  nsenter -t "$(anchor_pid "$h")" -n -m -u -- env "${BOX_ENV[@]}" bash -c 'cd "$0" && exec "$@"' "$REPO" "$@"
}

# probe HOST CMD...: a readiness check, bounded in time (a client of a dead server may retry for minutes)
probe() {
  local h=$1
  shift
  host_alive "$h" || return 1
  timeout "${PROBE_TIMEOUT:-15}" nsenter -t "$(anchor_pid "$h")" -n -m -u -- env "${BOX_ENV[@]}" bash -c 'cd "$0" && exec "$@"' "$REPO" "$@"
}

write_network_files() {
  mkdir -p "$ETC"
  {
    echo "127.0.0.1 localhost"
    for h in $(hosts); do echo "$(host_ip "$h") $h"; done
  } > "$ETC/hosts"
  # no name servers: a name outside the box fails at once instead of leaving the box
  echo "options timeout:1 attempts:1" > "$ETC/resolv.conf"
}

start_network() {
  ip netns add "$PREFIX-net"
  ip -n "$PREFIX-net" link add br0 type bridge
  ip -n "$PREFIX-net" link set br0 up
  ip -n "$PREFIX-net" link set lo up
}

start_host() {
  local h=$1 ip
  ip=$(host_ip "$h")
  local ns=$PREFIX-$h dir=$BOX_DIR/hosts/$h
  mkdir -p "$dir/tmp" "$BOX_DIR/munge" /run/munge
  chmod 1777 "$dir/tmp"
  ip netns list | grep -qw "$ns" || ip netns add "$ns"
  if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
    ip -n "$PREFIX-net" link add "v-$h" type veth peer name eth0 netns "$ns"
    ip -n "$PREFIX-net" link set "v-$h" master br0 up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  fi
  # the anchor: own hostname and mounts, then sleeps; its pid names the host's namespaces
  # (setsid: its own session, out of reach of a signal to the caller's process group)
  # A repository under /tmp (a clone in a temporary folder) would vanish under the host's own /tmp: the
  # anchor keeps it open as its working directory and binds it back at the same path.
  setsid nsenter --net="/run/netns/$ns" -- unshare --uts --mount --propagation private -- bash -c '
    set -e
    hostname "$0"
    mount --bind "$1/hosts" /etc/hosts
    mount --bind "$1/resolv.conf" /etc/resolv.conf
    mount --bind "$3" /run/munge
    cd "$4"
    mount --bind "$2" /tmp
    case "$4" in /tmp/*) mkdir -p "$4" && mount --no-canonicalize --bind /proc/self/cwd "$4" ;; esac
    cd /
    exec sleep infinity' "$h" "$ETC" "$dir/tmp" "$BOX_DIR/munge" "$REPO" </dev/null >/dev/null 2>"$LOG/anchor-$h.log" &
  echo $! > "$dir/anchor.pid"
  wait_for "host $h" 10 host_alive "$h"
}

# --- readiness ---------------------------------------------------------------------------------------------

# wait_for NAME SECONDS CMD...: poll CMD once a second; on timeout stop box-up with one line naming NAME.
# With WAIT_PID set, the service's process dying stops it at once.
wait_for() {
  local name=$1 secs=$2
  shift 2
  for _ in $(seq 1 "$secs"); do
    if [ -n "${WAIT_PID:-}" ] && [ ! -e "/proc/$WAIT_PID" ]; then
      die "$name exited while starting (logs: $LOG)"
    fi
    if "$@" >/dev/null 2>&1; then
      say "$name ready"
      return 0
    fi
    sleep 1
  done
  die "$name did not become ready in ${secs}s (logs: $LOG)"
}

munge_ready() { probe head bash -c 'munge -n | unmunge'; }
mariadb_ready() { probe head mariadb-admin --socket="$BOX_DIR/mariadb/mysqld.sock" ping; }
slurmdbd_ready() { probe head sacctmgr -n show cluster format=cluster; }
slurmctld_ready() { probe head scontrol ping | grep -q UP; }
slurmd_ready() { probe head sinfo -h -n "$1" -o %t | grep -Eq '^(idle|mix|alloc)'; }
postgres_ready() { probe head pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }
mlflow_ready() { probe head curl -sf "http://$HEAD_IP:$MLFLOW_PORT/health"; }
ray_ready() {  # every host has joined
  local n
  n=$(PROBE_TIMEOUT=60 probe head python -c "import ray; ray.init(address='$HEAD_IP:$RAY_PORT', logging_level='ERROR'); \
print(sum(1 for x in ray.nodes() if x['Alive']))" 2>/dev/null | tail -1)
  [ "$n" = "$(hosts | wc -l)" ]
}

# --- services ----------------------------------------------------------------------------------------------

start_munge() {
  local d=$BOX_DIR/munge
  mkdir -p "$d"
  chmod 755 "$d"  # clients of every host reach the socket here
  [ -f "$d/munge.key" ] || mungekey -c -k "$d/munge.key" -b 1024
  chmod 400 "$d/munge.key"
  on head munged --force --key-file="$d/munge.key" --pid-file="$d/munged.pid" \
    --seed-file="$d/munged.seed" --log-file="$LOG/munged.log"
  wait_for munged 10 munge_ready
}

start_mariadb() {
  local d=$BOX_DIR/mariadb
  if [ ! -d "$d/data/mysql" ]; then
    mkdir -p "$d/data"
    mariadb-install-db --user=root --datadir="$d/data" --auth-root-authentication-method=socket \
      >"$LOG/mariadb-install.log" 2>&1 || die "mariadb (install-db) failed (log: $LOG/mariadb-install.log)"
  fi
  on head bash -c "setsid mariadbd --no-defaults --user=root --datadir='$d/data' --socket='$d/mysqld.sock' \
    --pid-file='$d/mysqld.pid' --bind-address=127.0.0.1 --port=$MYSQL_PORT --log-error='$LOG/mariadb.log' \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --performance-schema=OFF </dev/null >/dev/null 2>&1 &"
  wait_for mariadb 30 mariadb_ready
  on head mariadb --socket="$d/mysqld.sock" -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(secret slurmdb)';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "mariadb (create slurm_acct_db) failed"
}

# secret NAME: a random password kept in the box dir (mode 600), the same across restarts
secret() {
  local f=$BOX_DIR/secrets/$1
  mkdir -p "$BOX_DIR/secrets"
  chmod 700 "$BOX_DIR/secrets"
  [ -s "$f" ] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$f")
  cat "$f"
}

write_slurm_conf() {
  local s=$BOX_DIR/slurm
  mkdir -p "$s/state" "$s/spool"
  local mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / (WORKERS + 1) ))
  local cpus
  cpus=$(nproc)
  cat > "$ETC/slurm.conf" <<EOF
# generated by infra/box/box.sh
ClusterName=$CLUSTER
SlurmctldHost=head($HEAD_IP)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$s/state
SlurmdSpoolDir=$s/spool/%n
SlurmctldPidFile=$s/slurmctld.pid
SlurmdPidFile=$s/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
# TorchX submits heterogeneous jobs (one component per node), which only the backfill scheduler starts
SchedulerParameters=bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# a lost node is DOWN after 10 s without an answer (a 20 s loss always downs it) and returns to service when its slurmd registers again; jobs submitted
# with --requeue (TorchX always) go back to the queue
SlurmdTimeout=10
ReturnToService=2
JobRequeue=1
# a requeued job is held for the step credential's lifetime before it starts again (120 s by default)
AuthInfo=cred_expire=30
KillWait=10
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HEAD_IP
AccountingStoragePort=6819
JobCompType=jobcomp/none
EOF
  for h in $(workers); do
    echo "NodeName=$h NodeAddr=$(host_ip "$h") CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >> "$ETC/slurm.conf"
  done
  echo "PartitionName=box Nodes=$(workers | paste -sd,) Default=YES MaxTime=INFINITE State=UP" >> "$ETC/slurm.conf"

  (umask 077 && cat > "$ETC/slurmdbd.conf" <<EOF
# generated by infra/box/box.sh
AuthType=auth/munge
DbdHost=head
DbdAddr=$HEAD_IP
DbdPort=6819
SlurmUser=root
PidFile=$s/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$(secret slurmdb)
StorageLoc=slurm_acct_db
EOF
  )
}

start_slurm() {
  write_slurm_conf
  on head slurmdbd
  wait_for slurmdbd 30 slurmdbd_ready
  on head sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  on head slurmctld
  wait_for slurmctld 30 slurmctld_ready
  for h in $(workers); do start_slurmd "$h"; done
  for h in $(workers); do wait_for "slurmd on $h" 30 slurmd_ready "$h"; done
}

start_slurmd() { mkdir -p "$BOX_DIR/slurm/spool/$1" && on "$1" slurmd -N "$1"; }

start_postgres() {
  local d=$BOX_DIR/postgres bin
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  mkdir -p "$d"
  chown postgres:postgres "$d"
  chmod 700 "$d"
  if [ ! -f "$d/data/PG_VERSION" ]; then
    local pw=$BOX_DIR/secrets/mlflowdb
    secret mlflowdb >/dev/null
    install -o postgres -m 600 "$pw" "$d/pwfile"
    runuser -u postgres -- "$bin/initdb" -D "$d/data" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
      --pwfile="$d/pwfile" >"$LOG/postgres-initdb.log" 2>&1 || die "postgresql (initdb) failed (log: $LOG/postgres-initdb.log)"
    rm -f "$d/pwfile"
  fi
  touch "$LOG/postgres.log" && chown postgres "$LOG/postgres.log"
  on head runuser -u postgres -- "$bin/pg_ctl" -D "$d/data" -l "$LOG/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $d -c shared_buffers=32MB" start >/dev/null \
    || die "postgresql failed to start (log: $LOG/postgres.log)"
  wait_for postgresql 30 postgres_ready
  local pw
  pw=$(secret mlflowdb)
  on head runuser -u postgres -- psql -q -h "$d" -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 -c "
    DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow') THEN
        CREATE ROLE mlflow LOGIN PASSWORD '$pw';
      END IF;
    END \$\$;" >/dev/null || die "postgresql (create role mlflow) failed"
  if ! on head runuser -u postgres -- psql -h "$d" -p "$PG_PORT" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1; then
    on head runuser -u postgres -- createdb -h "$d" -p "$PG_PORT" -O mlflow mlflow || die "postgresql (createdb mlflow) failed"
  fi
}

start_mlflow() {
  mkdir -p "$BOX_DIR/mlflow"
  local pw
  pw=$(secret mlflowdb)
  on head bash -c "MLFLOW_BACKEND=postgres MLFLOW_DB_URI='postgresql+psycopg2://mlflow:$pw@127.0.0.1:$PG_PORT/mlflow' \
    MLFLOW_HOME='$BOX_DIR/mlflow' MLFLOW_HOST=$HEAD_IP MLFLOW_PORT=$MLFLOW_PORT MLFLOW_WORKERS=1 \
    MLFLOW_AUTH=basic MLFLOW_AUTH_ADMIN_PASSWORD='$(secret mlflow_admin)' \
    MLFLOW_ALLOWED_HOSTS='head:$MLFLOW_PORT,$HEAD_IP:$MLFLOW_PORT' \
    setsid infra/mlflow_server.sh </dev/null >'$LOG/mlflow.log' 2>&1 & echo \$! > '$BOX_DIR/mlflow/server.pid'"
  WAIT_PID=$(cat "$BOX_DIR/mlflow/server.pid") wait_for "mlflow server" 120 mlflow_ready
}

# Ray: the head takes no tasks (--num-cpus 0), each worker host one CPU; everything bound to the box address.
# No dashboard (it needs ray[default]'s extra packages): ray.timeline() says which node ran which task.
start_ray_head() {
  [ -s "$BOX_DIR/secrets/ray_token" ] || (umask 077 && mkdir -p "$BOX_DIR/secrets" \
    && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$BOX_DIR/secrets/ray_token")
  on head setsid ray start --head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" --num-cpus=0 \
    --include-dashboard=false --disable-usage-stats >"$LOG/ray-head.log" 2>&1 || die "ray head failed to start (log: $LOG/ray-head.log)"
}
start_ray_worker() {
  on "$1" setsid ray start --address="$HEAD_IP:$RAY_PORT" --node-ip-address="$(host_ip "$1")" --num-cpus=1 \
    --disable-usage-stats >"$LOG/ray-$1.log" 2>&1 || die "ray worker on $1 failed to start (log: $LOG/ray-$1.log)"
}

# SeaweedFS across the hosts: the master and the filer with its S3 gateway on the head, a volume server on
# each worker (objects live on the workers' disks), one identity whose keys box-up generated.
start_weed_master() {
  mkdir -p "$BOX_DIR/seaweedfs/master"
  on head setsid weed master -ip="$HEAD_IP" -ip.bind="$HEAD_IP" -port="$WEED_MASTER_PORT" \
    -mdir="$BOX_DIR/seaweedfs/master" -volumeSizeLimitMB=64 -telemetry=false \
    </dev/null >"$LOG/weed-master.log" 2>&1 &
}
start_weed_volume() {
  mkdir -p "$BOX_DIR/seaweedfs/volume-$1"
  on "$1" setsid weed volume -ip="$(host_ip "$1")" -ip.bind="$(host_ip "$1")" -port="$WEED_VOLUME_PORT" \
    -dir="$BOX_DIR/seaweedfs/volume-$1" -max=20 -mserver="$HEAD_IP:$WEED_MASTER_PORT" -preStopSeconds=0 \
    </dev/null >"$LOG/weed-volume-$1.log" 2>&1 &
}
start_weed_filer() {
  local conf=$BOX_DIR/secrets/s3_identities.json
  (umask 077 && printf '{"identities": [{"name": "box", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' \
    "box-$(secret s3_access)" "$(secret s3_secret)" > "$conf")
  mkdir -p "$BOX_DIR/seaweedfs/filer"
  on head bash -c "cd '$BOX_DIR/seaweedfs/filer' && exec setsid weed filer -ip=$HEAD_IP -ip.bind=$HEAD_IP \
    -port=$WEED_FILER_PORT -master=$HEAD_IP:$WEED_MASTER_PORT -s3 -s3.port=$S3_PORT -s3.config='$conf' \
    -s3.port.iceberg=0 -s3.port.lance=0 -s3.autoCreateBucket=false" </dev/null >"$LOG/weed-filer.log" 2>&1 &
}
# the gateway answers with the box's keys and its bucket exists (created on first start)
s3_ready() {
  probe head python -c "
import botocore.session, sys
c = botocore.session.Session().create_client('s3')
try:
    c.head_bucket(Bucket='$S3_BUCKET')
except Exception as e:
    if 'Not Found' not in str(e) and '404' not in str(e):
        raise
    c.create_bucket(Bucket='$S3_BUCKET')
"
}
weed_volumes_ready() {  # every worker's volume server has registered with the master
  local n
  n=$(probe head curl -sf "http://$HEAD_IP:$WEED_MASTER_PORT/dir/status" | python3 -c \
    'import json, sys; t = json.load(sys.stdin)["Topology"]; print(sum(len(r["DataNodes"]) for dc in t["DataCenters"] for r in dc["Racks"]))' 2>/dev/null) || return 1
  [ "$n" -ge "$WORKERS" ]
}
start_seaweedfs() {
  start_weed_master
  for h in $(workers); do start_weed_volume "$h"; done
  wait_for "seaweedfs volume servers ($WORKERS)" 60 weed_volumes_ready
  start_weed_filer
  wait_for "seaweedfs s3 http://head:$S3_PORT (bucket $S3_BUCKET)" 60 s3_ready
}

# the environment of every process in the box (services and clients)
BOX_ENV=(
  "PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  "VIRTUAL_ENV=$VENV"
  "PYTHONPATH=$REPO"
  "HOME=${HOME:-/root}"
  "LANG=C.UTF-8"
  "SLURM_CONF=$ETC/slurm.conf"
  "MLFLOW_TRACKING_URI=http://head:$MLFLOW_PORT"
  # the tracking server runs MLflow's basic-auth app (infra/mlflow_server.sh: off loopback it must); the
  # box's clients and jobs use its admin account, whose password box-up generated
  "MLFLOW_TRACKING_USERNAME=admin"
  "MLFLOW_TRACKING_PASSWORD=$(secret mlflow_admin)"
  "RAY_ADDRESS=$HEAD_IP:$RAY_PORT"
  "TORCHXCONFIG=$REPO/infra/box/.torchxconfig"
  "RAY_USAGE_STATS_ENABLED=0"
  # token auth, with the box's own token (not ~/.ray/auth_token)
  "RAY_AUTH_MODE=token"
  "RAY_AUTH_TOKEN_PATH=$BOX_DIR/secrets/ray_token"
  "OMP_NUM_THREADS=1"
  # the box's object store (SeaweedFS, S3 API): s3://box/... from every host
  "AWS_ENDPOINT_URL=http://$HEAD_IP:$S3_PORT"
  "AWS_ACCESS_KEY_ID=box-$(secret s3_access)"
  "AWS_SECRET_ACCESS_KEY=$(secret s3_secret)"
  "AWS_DEFAULT_REGION=us-east-1"
)

# --- commands ----------------------------------------------------------------------------------------------

box_status() {
  local ok=0
  check() {
    local name=$1
    shift
    if "$@" >/dev/null 2>&1; then echo "ready  $name"; else echo "DOWN   $name"; ok=1; fi
  }
  for h in $(hosts); do check "host $h ($(host_ip "$h"))" host_alive "$h"; done
  host_alive head || return 1
  check munged munge_ready
  check mariadb mariadb_ready
  check slurmdbd slurmdbd_ready
  check slurmctld slurmctld_ready
  for h in $(workers); do check "slurmd $h" slurmd_ready "$h"; done
  check postgresql postgres_ready
  check "mlflow http://head:$MLFLOW_PORT" mlflow_ready
  check "ray $HEAD_IP:$RAY_PORT ($(hosts | wc -l) nodes)" ray_ready
  check "seaweedfs volume servers ($WORKERS)" weed_volumes_ready
  check "seaweedfs s3 http://head:$S3_PORT (bucket $S3_BUCKET)" s3_ready
  return $ok
}

box_up() {
  [ "$(id -u)" -eq 0 ] || die "box up needs root (network namespaces)"
  command -v slurmctld >/dev/null && command -v mariadbd >/dev/null || die "missing packages: run infra/box/install.sh"
  if ip netns list | grep -qw "$PREFIX-net"; then
    if box_status >/dev/null 2>&1; then
      say "up (nothing to do)"
      return 0
    fi
    say "partly up: restarting it"
    box_down
  fi
  mkdir -p "$LOG" "$BOX_DIR/hosts"
  write_network_files
  start_network
  for h in $(hosts); do start_host "$h"; done
  start_munge
  start_mariadb
  start_slurm
  start_postgres
  start_mlflow
  start_ray_head
  for h in $(workers); do start_ray_worker "$h"; done
  wait_for "ray cluster" 60 ray_ready
  start_seaweedfs
  box_env > "$BOX_DIR/env.sh"
  say "up: head $HEAD_IP, workers $(for h in $(workers); do printf '%s=%s ' "$h" "$(host_ip "$h")"; done)(logs: $LOG)"
}

# every pid in a namespace of the box; killing them all is "the host is gone"
ns_pids() { ip netns pids "$1" 2>/dev/null || true; }

kill_ns() {
  local ns=$1 sig=${2:-KILL} pids
  pids=$(ns_pids "$ns")
  [ -z "$pids" ] || kill "-$sig" $pids 2>/dev/null || true
}

box_down() {
  local ns
  # polite first (Ray, PostgreSQL, MariaDB flush their state), then SIGKILL what is left
  for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true); do kill_ns "$ns" TERM; done
  for _ in $(seq 1 15); do
    local left=0
    for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true); do
      [ -z "$(ns_pids "$ns")" ] || left=1
    done
    [ "$left" = 0 ] && break
    sleep 1
  done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true); do
    kill_ns "$ns" KILL
    ip netns del "$ns"
  done
  rm -f "$BOX_DIR"/hosts/*/anchor.pid "$BOX_DIR/env.sh"
  # the mount point box-up made for the hosts' /run/munge (empty: the socket lives in the box dir)
  [ ! -d /run/munge ] || rmdir --ignore-fail-on-non-empty /run/munge
  say "down"
}

box_env() {
  for kv in "${BOX_ENV[@]}"; do printf 'export %q\n' "$kv"; done
}

kill_host() {
  local h=$1
  [ "$h" != head ] || die "kill-host: only worker hosts (the head holds the controller and the databases)"
  kill_ns "$PREFIX-$h" KILL
  rm -f "$BOX_DIR/slurm/slurmd-$h.pid"
  say "host $h lost (every process in its namespace killed)"
}

start_worker_host() {
  local h=$1
  host_alive "$h" || start_host "$h"
  start_slurmd "$h"
  start_ray_worker "$h"
  start_weed_volume "$h"
  wait_for "slurmd on $h" 60 slurmd_ready "$h"
  say "host $h back"
}

# restart SERVICE [SECONDS]: stop a head service, leave it down SECONDS (default 0), start it again.
# mlflow: the tracking server (SIGTERM to its process group: the gunicorn/uvicorn workers with it)
restart_service() {
  local svc=$1 down=${2:-0} pid
  case "$svc" in
    mlflow)
      pid=$(cat "$BOX_DIR/mlflow/server.pid" 2>/dev/null) || die "restart mlflow: no server pid file"
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 1 30); do
        [ -e "/proc/$pid" ] || break
        sleep 1
      done
      [ ! -e "/proc/$pid" ] || kill -KILL -- "-$pid" 2>/dev/null || true
      say "mlflow server stopped"
      sleep "$down"
      start_mlflow
      ;;
    *) die "restart: only mlflow" ;;
  esac
}

# The box's daemons outlive this script: they must not inherit its caller's open files (a lock the caller
# holds, a pipe a CI runner waits on to close). 255 is bash's own descriptor of this script.
close_inherited_fds() {
  local fd
  for fd in $(ls /proc/$$/fd); do
    if [ "$fd" -gt 2 ] && [ "$fd" != 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
  done
}

cmd=${1:-}
shift || true
case "$cmd" in up | start-host | restart) close_inherited_fds ;; esac
case "$cmd" in
  up) box_up ;;
  down) box_down ;;
  status) box_status ;;
  env) box_env ;;
  exec)
    [ $# -ge 2 ] || die "usage: box.sh exec HOST CMD..."
    on "$@"
    ;;
  kill-host) kill_host "${1:?usage: box.sh kill-host HOST}" ;;
  start-host) start_worker_host "${1:?usage: box.sh start-host HOST}" ;;
  restart) restart_service "${1:?usage: box.sh restart mlflow [SECONDS]}" "${2:-0}" ;;
  *) die "usage: box.sh up|down|status|env|exec HOST CMD...|kill-host HOST|start-host HOST|restart mlflow [SECONDS]" ;;
esac
