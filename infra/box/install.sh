#!/usr/bin/env bash
# Debian packages the box needs (infra/box/README.md). Installs only what is missing; a no-op when all are
# present. Run as root. The distribution's services are not started here and are stopped if the package
# scripts start them: the box runs its own copies inside its namespaces, with configs under its state dir.
set -euo pipefail

PACKAGES=(
  iproute2           # ip netns, bridge, veth
  munge              # Slurm's authentication
  slurm-wlm          # slurmctld, slurmd, sbatch/srun/squeue/scontrol
  slurmdbd           # Slurm accounting daemon: sacct, hence `torchx status` / `torchx log`
  mariadb-server     # slurmdbd's database
  postgresql         # the MLflow tracking server's backend store
  procps             # pkill/pgrep for box-down
  curl               # readiness checks over HTTP
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "infra/box/install.sh: missing ${missing[*]}; run as root to install them" >&2
  exit 1
fi
echo "infra/box/install.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101 keeps the packages' postinst from starting the system services (none of them is used)
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
