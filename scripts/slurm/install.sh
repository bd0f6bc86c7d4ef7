#!/usr/bin/env bash
# Install the Debian packages of a single-node Slurm cluster (idempotent; run as root).
#
#   bash scripts/slurm/install.sh        # slurm-wlm, munge, slurmdbd, mariadb-server
#
# Only installs: no daemon is started here (scripts/slurm/start.sh does that, under a directory of
# its own). On hosts with an init system, Debian's maintainer scripts would start the packaged
# munge/mariadb/slurm services; a temporary policy-rc.d (removed afterwards, and only if this
# script created it) tells invoke-rc.d not to, so the cluster consists only of what start.sh starts.
set -euo pipefail

need=(slurmctld slurmd slurmdbd munged mariadbd mariadb-install-db sbatch sacct)
missing=()
for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "slurm/install: already installed (slurm-wlm $(dpkg-query -W -f '${Version}' slurm-wlm 2>/dev/null), $(munged --version 2>&1 | head -1))"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "slurm/install: missing ${missing[*]}; run as root to install them" >&2
    exit 1
fi
echo "slurm/install: installing slurm-wlm munge slurmdbd mariadb-server (missing: ${missing[*]})"
POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"
    chmod 0755 "$POLICY"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge slurmdbd mariadb-server >/dev/null
echo "slurm/install: done (slurm-wlm $(dpkg-query -W -f '${Version}' slurm-wlm))"
