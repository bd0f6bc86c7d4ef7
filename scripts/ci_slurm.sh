#!/usr/bin/env bash
# CI tier with a real Slurm cluster (run as root, after scripts/bootstrap.sh):
#
#   bash scripts/ci_slurm.sh            # install + start a single-node cluster, pytest -m slurm, stop it
#   bash scripts/ci_slurm.sh -x -v      # extra arguments go to pytest
#
# Installs the Debian packages (scripts/slurm/install.sh; a no-op when present), starts munged,
# MariaDB, slurmdbd, slurmctld and slurmd under a fresh directory (scripts/slurm/start.sh), runs the
# tests marked `slurm`, and stops exactly the daemons it started, also when the tests fail or the
# start fails half-way. Exit status: pytest's (or 1 if the cluster could not be started).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
SLURM_ROOT=${SLURM_ROOT:-$(mktemp -d /tmp/bench-slurm.XXXXXX)}
export SLURM_ROOT

bash scripts/slurm/install.sh
stop() { bash scripts/slurm/stop.sh || true; }
trap stop EXIT
bash scripts/slurm/start.sh
export SLURM_CONF="$SLURM_ROOT/slurm.conf"
.venv/bin/python -m pytest -m slurm tests/test_slurm.py "$@"
