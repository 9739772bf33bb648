#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster with accounting on this machine, as root,
# without systemd: munged, MariaDB, slurmdbd, slurmctld, slurmd. Idempotent: a healthy
# cluster with the same settings is left alone; changed settings are applied.
#
# Settings (environment):
#   SLURM_MAX_ARRAY_SIZE   MaxArraySize            (default 1001)
#   SLURM_MAX_JOB_COUNT    MaxJobCount             (default 50000)
#   SLURM_NODE_CPUS        CPUs the node offers    (default: nproc)
#   SLURM_CLUSTER_NAME     accounting cluster name (default embedfleet)
# Used by `make slurm-up` and by `make test` (tests/test_slurm_*.py need it).
set -euo pipefail

MAX_ARRAY=${SLURM_MAX_ARRAY_SIZE:-1001}
MAX_JOBS=${SLURM_MAX_JOB_COUNT:-50000}
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
CLUSTER=${SLURM_CLUSTER_NAME:-embedfleet}
HOST=$(hostname -s)
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

say() { echo "[slurm-up] $*"; }
die() {
  echo "[slurm-up] ERROR: $*" >&2
  for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmdbd.log "$LOG_DIR"/slurmd.log /var/log/mysql/error.log; do
    [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 25 "$f" >&2; }
  done
  exit 1
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq 1 $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${limit}s waiting for $what"
}
running() { pgrep -x "$1" >/dev/null 2>&1; }

[ "$(id -u)" = 0 ] || die "run as root (the test cluster runs its daemons as root)"

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install failed"
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if ! running munged; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start"
  fi
  wait_for 10 "munge" sh -c 'munge -n | unmunge'
}

start_mariadb() {
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if ! mysqladmin --protocol=socket ping >/dev/null 2>&1; then
    say "starting MariaDB"
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    (setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql \
       --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
       --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 \
       >>/var/log/mysql-embedfleet.log 2>&1 &)
    wait_for 60 "MariaDB" mysqladmin --protocol=socket ping
  fi
}

db_password() {
  # Generated once, kept only in slurmdbd.conf (mode 600): never in the repo or logs.
  if [ -f "$CONF_DIR/slurmdbd.conf" ] && grep -q '^StoragePass=' "$CONF_DIR/slurmdbd.conf"; then
    sed -n 's/^StoragePass=//p' "$CONF_DIR/slurmdbd.conf"
  else
    head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9'
  fi
}

start_slurmdbd() {
  local pass; pass=$(db_password)
  mysql --protocol=socket <<SQL || die "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
  mkdir -p "$CONF_DIR" "$LOG_DIR" /run/slurm
  umask 077
  cat > "$CONF_DIR/slurmdbd.conf.new" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$pass
CONF
  umask 022
  replace_if_changed "$CONF_DIR/slurmdbd.conf" && restart=1 || restart=0
  chmod 600 "$CONF_DIR/slurmdbd.conf"
  if running slurmdbd && [ "$restart" = 1 ]; then pkill -x slurmdbd; sleep 1; fi
  if ! running slurmdbd; then
    say "starting slurmdbd"
    /usr/sbin/slurmdbd || die "slurmdbd failed to start"
  fi
  wait_for 30 "slurmdbd" sacctmgr -n show cluster
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
  fi
}

replace_if_changed() {  # installs $1.new as $1; returns 0 if it changed
  if [ -f "$1" ] && cmp -s "$1" "$1.new"; then rm -f "$1.new"; return 1; fi
  mv "$1.new" "$1"; return 0
}

write_slurm_conf() {
  local overrides=""
  [ "$CPUS" -gt "$(nproc)" ] && overrides="SlurmdParameters=config_overrides"
  cat > "$CONF_DIR/slurm.conf.new" <<CONF
# Written by scripts/slurm/up.sh: a single-node test cluster with accounting.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
MaxArraySize=$MAX_ARRAY
MaxJobCount=$MAX_JOBS
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=30
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_min_interval=100000
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
$overrides
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
  replace_if_changed "$CONF_DIR/slurm.conf"
}

start_slurm() {
  if [ "$SLURM_CONF_CHANGED" = 1 ] && running slurmctld; then
    say "slurm.conf changed: restarting slurmctld and slurmd"
    pkill -x slurmd || true; pkill -x slurmctld || true
    for _ in $(seq 50); do running slurmctld || running slurmd || break; sleep 0.2; done
  fi
  if ! running slurmctld; then
    say "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld failed to start"
  fi
  if ! running slurmd; then
    say "starting slurmd"
    /usr/sbin/slurmd || die "slurmd failed to start"
  fi
  wait_for 30 "slurmctld" scontrol ping
  wait_for 30 "node $HOST to register" sh -c "sinfo -h -n $HOST -o %T | grep -Eq 'idle|mixed|alloc'"
}

healthy() {
  running munged && running slurmdbd && running slurmctld && running slurmd || return 1
  scontrol ping >/dev/null 2>&1 || return 1
  sinfo -h -n "$HOST" -o %T 2>/dev/null | grep -Eq 'idle|mixed|alloc' || return 1
  sacctmgr -n show cluster >/dev/null 2>&1 || return 1
  [ "$(scontrol show config | sed -n 's/^MaxArraySize *= *//p')" = "$MAX_ARRAY" ] || return 1
  [ "$(scontrol show node "$HOST" | sed -n 's/.*CPUTot=\([0-9]*\).*/\1/p')" = "$CPUS" ] || return 1
}

if [ "${1:-}" = "--check" ]; then
  healthy && { say "healthy"; exit 0; }
  say "not running or not healthy"; exit 1
fi
if healthy; then say "already up (MaxArraySize=$MAX_ARRAY, CPUs=$CPUS)"; exit 0; fi
install_packages
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" /run/slurm
# slurm.conf first: sacctmgr reads it to find slurmdbd.
SLURM_CONF_CHANGED=0
write_slurm_conf && SLURM_CONF_CHANGED=1
start_munge
start_mariadb
start_slurmdbd
start_slurm
healthy || die "cluster did not become healthy"
say "up: node $HOST, $CPUS CPUs, MaxArraySize=$MAX_ARRAY, accounting cluster $CLUSTER"
