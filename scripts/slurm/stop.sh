#!/usr/bin/env bash
# Stop exactly the daemons scripts/slurm/start.sh started under SLURM_ROOT (and the jobs they run).
#
#   SLURM_ROOT=/tmp/bench-slurm bash scripts/slurm/stop.sh
#
# It reads $SLURM_ROOT/started (name, pid, executable per daemon), cancels the cluster's jobs while
# slurmctld is still up, then stops the daemons in reverse start order: SIGTERM, wait up to
# STOP_WAIT seconds, then SIGKILL (a slurmd retrying its registration may ignore SIGTERM). A pid
# whose executable is no longer the recorded one (the daemon died and the pid was reused) is left
# alone. Safe to run twice; exits 0 when nothing it started is left running.
set -uo pipefail

SLURM_ROOT=${SLURM_ROOT:?set SLURM_ROOT to the directory given to start.sh}
STOP_WAIT=${STOP_WAIT:-10}
STARTED="$SLURM_ROOT/started"
if [ ! -f "$STARTED" ]; then
    echo "slurm/stop: nothing recorded in $STARTED"
    exit 0
fi

ours() {  # ours PID EXE: is PID still the process start.sh recorded?
    [ -n "$1" ] && [ "$(readlink "/proc/$1/exe" 2>/dev/null || true)" = "$2" ]
}

# Cancel the cluster's jobs first, so that slurmd stops their steps itself.
ctld_pid=$(awk '$1 == "slurmctld" {print $2}' "$STARTED")
ctld_exe=$(awk '$1 == "slurmctld" {print $3}' "$STARTED")
if [ -f "$SLURM_ROOT/slurm.conf" ] && ours "$ctld_pid" "$ctld_exe"; then
    export SLURM_CONF="$SLURM_ROOT/slurm.conf"
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        echo "slurm/stop: cancelling jobs $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null
        for i in $(seq 40); do
            [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

status=0
# reverse start order
tac "$STARTED" | while read -r name pid exe; do
    if ! ours "$pid" "$exe"; then
        echo "slurm/stop: $name ($pid) is not running"
        continue
    fi
    echo "slurm/stop: TERM $name ($pid)"
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq $((STOP_WAIT * 5))); do ours "$pid" "$exe" || break; sleep 0.2; done
    if ours "$pid" "$exe"; then
        echo "slurm/stop: KILL $name ($pid)"
        kill -KILL "$pid" 2>/dev/null
        for i in $(seq 25); do ours "$pid" "$exe" || break; sleep 0.2; done
    fi
done
while read -r name pid exe; do
    if ours "$pid" "$exe"; then
        echo "slurm/stop: $name ($pid) is STILL running" >&2
        status=1
    fi
done < "$STARTED"
[ "$status" = 0 ] && echo "slurm/stop: stopped everything start.sh started under $SLURM_ROOT"
exit "$status"
