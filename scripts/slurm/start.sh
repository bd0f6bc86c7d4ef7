#!/usr/bin/env bash
# Start a real single-node Slurm cluster whose every file lives under one directory (run as root).
#
#   SLURM_ROOT=/tmp/bench-slurm bash scripts/slurm/start.sh        # munged, mariadbd, slurmdbd, slurmctld, slurmd
#   SLURM_ROOT=/tmp/bench-slurm WITH_DBD=0 bash scripts/slurm/start.sh   # no accounting database (no sacct)
#   source /tmp/bench-slurm/env.sh                                  # sets SLURM_CONF for sbatch/squeue/submitit
#   SLURM_ROOT=/tmp/bench-slurm bash scripts/slurm/stop.sh          # stops exactly what this started
#
# Layout of $SLURM_ROOT: slurm.conf, slurmdbd.conf, env.sh, started (one line per daemon this script
# started: name, pid, executable), log/, state/, spool/, munge/ (key, socket), mysql/ (data dir).
# Nothing is written to /etc, and the packaged system services are left alone.
#
# Why slurmdbd + MariaDB by default: without accounting, sacct (which submitit polls) reports no
# state, so a cancelled or killed job looks "running" forever (seen with submitit 1.5.4 on Slurm 22.05:
# every poll logs "Slurm accounting storage is disabled" and the state stays UNKNOWN).
# Ports (override if they clash): SLURM_PORT_BASE (slurmctld; slurmd +1, slurmdbd +2), DB_PORT.
# A failure part-way stops whatever was already started, prints the relevant log, and exits 1.
set -euo pipefail

SLURM_ROOT=${SLURM_ROOT:?set SLURM_ROOT to a directory for the cluster\'s files}
WITH_DBD=${WITH_DBD:-1}
PORT=${SLURM_PORT_BASE:-6817}
DB_PORT=${DB_PORT:-3307}
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" != 0 ]; then echo "slurm/start: run as root (slurmd and munged need it)" >&2; exit 1; fi
for b in munged slurmctld slurmd; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || { echo "slurm/start: $b not found; run scripts/slurm/install.sh" >&2; exit 1; }
done
mkdir -p "$SLURM_ROOT"
SLURM_ROOT=$(cd "$SLURM_ROOT" && pwd)
chmod a+x "$SLURM_ROOT"   # munged (user munge) insists on a+x on every directory above its socket (mktemp -d gives 0700)
STARTED="$SLURM_ROOT/started"

# Refuse to start twice on the same root (stop.sh first).
if [ -f "$STARTED" ]; then
    while read -r name pid exe; do
        if [ -n "${pid:-}" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null || true)" = "$exe" ]; then
            echo "slurm/start: $name (pid $pid) from an earlier start is still running; run scripts/slurm/stop.sh first" >&2
            exit 1
        fi
    done < "$STARTED"
    rm -f "$STARTED"
fi

NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
SOCK="$SLURM_ROOT/munge/munge.socket"
CONF="$SLURM_ROOT/slurm.conf"
mkdir -p "$SLURM_ROOT"/{state,spool,log,munge}
: > "$STARTED"

failed() {
    echo "slurm/start: FAILED at: $1" >&2
    for f in "$SLURM_ROOT"/munge/munged.log "$SLURM_ROOT"/mysql/mysqld.err "$SLURM_ROOT"/log/*.log; do
        [ -s "$f" ] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }
    done
    SLURM_ROOT="$SLURM_ROOT" bash "$HERE/stop.sh" >&2 || true
    exit 1
}

# record NAME PIDFILE: wait for the daemon's pid file, check the process is alive, remember it.
record() {
    local name=$1 pidfile=$2 pid="" i
    for i in $(seq 100); do
        [ -s "$pidfile" ] && pid=$(tr -dc '0-9' < "$pidfile") && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && break
        pid=""
        sleep 0.1
    done
    [ -n "$pid" ] || failed "$name did not start (no live pid in $pidfile)"
    echo "$name $pid $(readlink "/proc/$pid/exe")" >> "$STARTED"
    echo "slurm/start: $name pid $pid"
}

# ---- munge: authentication, with its socket and key under $SLURM_ROOT -----------------------------
chown munge:munge "$SLURM_ROOT/munge"
chmod 0711 "$SLURM_ROOT/munge"   # munged refuses a socket directory without o+x
KEY="$SLURM_ROOT/munge/munge.key"
if [ ! -s "$KEY" ]; then
    head -c 1024 /dev/urandom > "$KEY"
    chown munge:munge "$KEY"
    chmod 0400 "$KEY"
fi
runuser -u munge -- /usr/sbin/munged --key-file="$KEY" --socket="$SOCK" --pid-file="$SLURM_ROOT/munge/munged.pid" \
    --log-file="$SLURM_ROOT/munge/munged.log" --seed-file="$SLURM_ROOT/munge/munged.seed" --num-threads=4 \
    || failed "munged"
record munged "$SLURM_ROOT/munge/munged.pid"
for i in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
munge -S "$SOCK" -n | unmunge -S "$SOCK" >/dev/null || failed "munge round trip"

# ---- accounting: MariaDB + slurmdbd ------------------------------------------------------------------
if [ "$WITH_DBD" = 1 ]; then
    ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$SOCK
JobAcctGatherType=jobacct_gather/linux"
    DB="$SLURM_ROOT/mysql"
    mkdir -p "$DB"
    if [ ! -d "$DB/data/mysql" ]; then
        mariadb-install-db --user=root --datadir="$DB/data" --auth-root-authentication-method=normal --skip-test-db \
            > "$DB/install.log" 2>&1 || failed "mariadb-install-db (see $DB/install.log)"
    fi
    # mariadbd stays in the foreground: detach it completely, or the calling shell never returns.
    setsid /usr/sbin/mariadbd --user=root --datadir="$DB/data" --socket="$DB/mysqld.sock" --pid-file="$DB/mysqld.pid" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --log-error="$DB/mysqld.err" \
        < /dev/null > /dev/null 2>&1 &
    record mariadbd "$DB/mysqld.pid"
    ok=0
    for i in $(seq 150); do mariadb -S "$DB/mysqld.sock" -uroot -e 'select 1' > /dev/null 2>&1 && { ok=1; break; }; sleep 0.2; done
    [ "$ok" = 1 ] || failed "mariadbd did not accept connections"
    mariadb -S "$DB/mysqld.sock" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'bench-slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" || failed "database user"
    cat > "$SLURM_ROOT/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
LogFile=$SLURM_ROOT/log/slurmdbd.log
PidFile=$SLURM_ROOT/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=bench-slurm
StorageLoc=slurm_acct_db
CONF
    chmod 600 "$SLURM_ROOT/slurmdbd.conf"
else
    ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# A requeued job is held (BeginTime) for cred_expire + 1 s before it may start again: its old job
# credential is revoked on the node until then, and a job started inside that window is killed at
# launch ("Job credential revoked"). Slurm's default is 120 s; 10 s keeps a requeue test short.
CRED_EXPIRE=${CRED_EXPIRE:-10}

# ---- slurm.conf ----------------------------------------------------------------------------------------
# FirstJobId from the clock: job ids never restart at 1 when the state directory is fresh, so an id
# cannot collide with one a previous cluster handed out (submitit folders keyed by job id).
cat > "$CONF" <<CONF
ClusterName=benchcluster
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$SLURM_ROOT/state
SlurmdSpoolDir=$SLURM_ROOT/spool
SlurmctldPidFile=$SLURM_ROOT/slurmctld.pid
SlurmdPidFile=$SLURM_ROOT/slurmd.pid
SlurmctldLogFile=$SLURM_ROOT/log/slurmctld.log
SlurmdLogFile=$SLURM_ROOT/log/slurmd.log
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
FirstJobId=$(( ($(date +%s) % 100000) * 10 + 1000 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$ACCT
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$CONF"
echo "export SLURM_CONF=$CONF" > "$SLURM_ROOT/env.sh"

if [ "$WITH_DBD" = 1 ]; then
    /usr/sbin/slurmdbd || failed "slurmdbd"   # reads slurmdbd.conf next to \$SLURM_CONF (it has no -f)
    record slurmdbd "$SLURM_ROOT/slurmdbd.pid"
    ok=0
    for i in $(seq 100); do timeout 5 sacctmgr -n show cluster > /dev/null 2>&1 && { ok=1; break; }; sleep 0.2; done
    [ "$ok" = 1 ] || failed "slurmdbd did not answer"
    timeout 20 sacctmgr -i add cluster benchcluster > /dev/null 2>&1 || true   # exists already on a reused root
    timeout 5 sacctmgr -n -P show cluster format=cluster | grep -qx benchcluster || failed "cluster not registered in slurmdbd"
fi
/usr/sbin/slurmctld -f "$CONF" || failed "slurmctld"
record slurmctld "$SLURM_ROOT/slurmctld.pid"
/usr/sbin/slurmd -f "$CONF" || failed "slurmd"
record slurmd "$SLURM_ROOT/slurmd.pid"
ok=0
for i in $(seq 60); do timeout 5 sinfo -h -o %T 2>/dev/null | grep -q '^idle' && { ok=1; break; }; sleep 0.5; done
[ "$ok" = 1 ] || failed "the node did not become idle"
echo "slurm/start: up: $(timeout 5 sinfo -h -o '%P %D %T %c CPUs') ($(dpkg-query -W -f '${Version}' slurm-wlm 2>/dev/null), accounting: $([ "$WITH_DBD" = 1 ] && echo slurmdbd || echo none))"
echo "slurm/start: source $SLURM_ROOT/env.sh   # export SLURM_CONF"
