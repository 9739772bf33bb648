#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster with accounting on this machine, as root,
# without systemd: munged, MariaDB, slurmdbd, slurmctld, slurmd. Idempotent: a healthy
# cluster with the same settings is left alone; changed settings are applied.
#
# The cluster is private: its configuration, state, munge key and socket, MariaDB datadir
# and socket, pid and log files all live under EMBEDFLEET_SLURM_DIR (default
# /tmp/embedfleet-slurm), on ports of its own, and only the daemons whose pids it recorded
# are ever stopped. Nothing under /etc or /run is read or written (apart from installing
# missing packages, with their system services kept from starting). Clients find it through
# SLURM_CONF=$EMBEDFLEET_SLURM_DIR/slurm.conf (`up.sh --conf` prints it).
#
# Settings (environment):
#   EMBEDFLEET_SLURM_DIR        the cluster's directory (see common.sh)
#   EMBEDFLEET_SLURM_PORT_BASE  its first of four ports (default 6917)
#   SLURM_MAX_ARRAY_SIZE        MaxArraySize            (default 1001)
#   SLURM_MAX_JOB_COUNT         MaxJobCount             (default 50000)
#   SLURM_NODE_CPUS             CPUs the node offers    (default: nproc)
#   SLURM_CLUSTER_NAME          accounting cluster name (default embedfleet)
# A machine that runs SLURM daemons of its own (a cluster node, a workstation) is refused
# unless EMBEDFLEET_SLURM_DIR is set: saying where the test cluster lives is the consent to
# run it beside them.
# Used by `make slurm-up` and by `make test` (tests/slurm/ need it).
set -euo pipefail
# shellcheck source=scripts/slurm/common.sh
. "$(dirname "$0")/common.sh"

if [ "${1:-}" = "--conf" ]; then echo "$SLURM_CONF"; exit 0; fi

MAX_ARRAY=${SLURM_MAX_ARRAY_SIZE:-1001}
MAX_JOBS=${SLURM_MAX_JOB_COUNT:-50000}
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
CLUSTER=${SLURM_CLUSTER_NAME:-embedfleet}
HOST=$(hostname -s)
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)

say() { echo "[slurm-up] $*"; }
die() {
  echo "[slurm-up] ERROR: $*" >&2
  for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmdbd.log "$LOG_DIR"/slurmd.log \
           "$DB_RUN"/mariadb.log "$MUNGE_DIR"/log/munged.log; do
    [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 25 "$f" >&2; }
  done
  exit 1
}
refuse() { echo "[slurm-up] ERROR: $*" >&2; exit 1; }  # nothing started: no logs to show
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq 1 $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${limit}s waiting for $what"
}

started_by_us() {  # started_by_us PID: it runs with this cluster's SLURM_CONF
  tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF"
}

foreign_daemons() {  # the live SLURM daemons here that this cluster did not start
  local name pid out=""
  for name in slurmctld slurmd slurmdbd; do
    for pid in $(pgrep -x "$name" || true); do
      # Zombies (a daemonizing parent not yet reaped) and our own processes, including
      # ones between fork and writing their pid file, are not another SLURM.
      alive "$pid" "$name" || continue
      started_by_us "$pid" || out+="$name (pid $pid) "
    done
  done
  echo "${out% }"
}

check_port() {  # check_port NAME PORT: before starting NAME, its port must be free
  if ss -Hltn "sport = :$2" 2>/dev/null | grep -q .; then
    refuse "port $2 (for $1) is in use by another program; choose other ports with EMBEDFLEET_SLURM_PORT_BASE=N (uses N..N+3)"
  fi
}

refuse_beside_a_system_slurm() {
  local foreign; foreign=$(foreign_daemons)
  [ -z "$foreign" ] && return 0
  [ -n "$SLURM_DIR_GIVEN" ] && { say "beside this machine's own SLURM ($foreign), in $SLURM_DIR"; return 0; }
  local hint=""
  if head -n 1 /etc/slurm/slurm.conf 2>/dev/null | grep -q '^# Written by scripts/slurm/up.sh'; then
    hint=" (/etc/slurm/slurm.conf was written by an older scripts/slurm/up.sh: stop those daemons by hand, then rerun)"
  fi
  refuse "this machine runs SLURM daemons that this script did not start: $foreign$hint.
  The test cluster never touches them (its files are under $SLURM_DIR, its ports $CTLD_PORT-$DB_PORT),
  but to run it beside them say where it lives: EMBEDFLEET_SLURM_DIR=/path/of/its/own make slurm-up"
}

[ "$(id -u)" = 0 ] || die "run as root (the test cluster runs its daemons as root)"

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]} (their system services are kept from starting)"
  export DEBIAN_FRONTEND=noninteractive
  # Debian starts a package's daemon on install unless policy-rc.d says no: the system's
  # munged/mariadbd/slurm* must not start (they would take SLURM's and MariaDB's default
  # sockets and ports on this machine).
  local policy=/usr/sbin/policy-rc.d placed=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# placed by embedfleet scripts/slurm/up.sh while it installs packages\nexit 101\n' >"$policy"
    chmod 755 "$policy"; placed=1
  fi
  local ok=1
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || ok=0
  [ "$placed" = 1 ] && rm -f "$policy"
  [ "$ok" = 1 ] || die "apt-get install ${missing[*]} failed"
}

make_dirs() {
  mkdir -p "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
  mkdir -p "$MUNGE_DIR"/etc "$MUNGE_DIR"/run "$MUNGE_DIR"/lib "$MUNGE_DIR"/log
  chown munge:munge "$MUNGE_DIR" "$MUNGE_DIR"/etc "$MUNGE_DIR"/run "$MUNGE_DIR"/lib "$MUNGE_DIR"/log
  chmod 0755 "$MUNGE_DIR" "$MUNGE_DIR"/run
  chmod 0700 "$MUNGE_DIR"/etc "$MUNGE_DIR"/lib "$MUNGE_DIR"/log
  mkdir -p "$DB_DATADIR" "$DB_RUN"
  chown mysql:mysql "$DB_DATADIR" "$DB_RUN"
}

munge_ok() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }

start_munge() {
  if [ ! -s "$MUNGE_KEY" ]; then
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
  fi
  chown munge:munge "$MUNGE_KEY" && chmod 400 "$MUNGE_KEY"
  if ! running munged; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged --key-file="$MUNGE_KEY" --socket="$MUNGE_SOCKET" \
      --pid-file="$(pid_file munged)" --log-file="$MUNGE_DIR/log/munged.log" \
      --seed-file="$MUNGE_DIR/lib/munged.seed" 9>&- || die "munged failed to start"
  fi
  wait_for 10 "munge" munge_ok
}

start_mariadb() {
  if ! running mariadbd; then
    check_port MariaDB "$DB_PORT"
    say "starting MariaDB"
    if [ ! -d "$DB_DATADIR/mysql" ]; then
      mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DATADIR" \
        --auth-root-authentication-method=socket --skip-test-db \
        >"$LOG_DIR/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG_DIR/mariadb-install.log)"
    fi
    (setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DATADIR" \
       --socket="$DB_SOCKET" --pid-file="$(pid_file mariadbd)" \
       --port="$DB_PORT" --bind-address=127.0.0.1 --log-error="$DB_RUN/mariadb.log" \
       --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 \
       </dev/null >>"$DB_RUN/mariadb.out" 2>&1 9>&- &)
    wait_for 60 "MariaDB" mysqladmin_ ping
    wait_for 10 "MariaDB's pid file" running mariadbd
  fi
}

db_password() {
  # Generated once, kept only in slurmdbd.conf (mode 600): never in the repo or logs.
  if [ -f "$SLURM_DIR/slurmdbd.conf" ] && grep -q '^StoragePass=' "$SLURM_DIR/slurmdbd.conf"; then
    sed -n 's/^StoragePass=//p' "$SLURM_DIR/slurmdbd.conf"
  else
    head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9'
  fi
}

start_slurmdbd() {
  local pass restart; pass=$(db_password)
  # slurmdbd connects over TCP to 127.0.0.1 (so it reaches this MariaDB, not a system one
  # on the default socket): the account exists for both host names MariaDB may see.
  mysql_ <<SQL || die "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL
  umask 077
  cat > "$SLURM_DIR/slurmdbd.conf.new" <<CONF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$(pid_file slurmdbd)
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$pass
CONF
  umask 022
  replace_if_changed "$SLURM_DIR/slurmdbd.conf" && restart=1 || restart=0
  chmod 600 "$SLURM_DIR/slurmdbd.conf"
  if running slurmdbd && [ "$restart" = 1 ]; then stop_ours slurmdbd; fi
  if ! running slurmdbd; then
    check_port slurmdbd "$DBD_PORT"
    say "starting slurmdbd"
    /usr/sbin/slurmdbd 9>&- || die "slurmdbd failed to start"
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
  cat > "$SLURM_CONF.new" <<CONF
# Written by scripts/slurm/up.sh: a private single-node test cluster with accounting.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
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
AccountingStoragePort=$DBD_PORT
# For connections to slurmdbd, SLURM takes the munge socket from here, not AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
$overrides
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
  replace_if_changed "$SLURM_CONF"
}

start_slurm() {
  if [ "$SLURM_CONF_CHANGED" = 1 ] && { running slurmctld || running slurmd; }; then
    say "slurm.conf changed: restarting slurmctld and slurmd"
    stop_ours slurmd; stop_ours slurmctld
  fi
  if ! running slurmctld; then
    check_port slurmctld "$CTLD_PORT"
    say "starting slurmctld"
    /usr/sbin/slurmctld -f "$SLURM_CONF" 9>&- || die "slurmctld failed to start"
  fi
  if ! running slurmd; then
    check_port slurmd "$SLURMD_PORT"
    say "starting slurmd"
    /usr/sbin/slurmd -f "$SLURM_CONF" 9>&- || die "slurmd failed to start"
  fi
  wait_for 30 "slurmctld" scontrol ping
  wait_for 30 "node $HOST to register" sh -c "sinfo -h -n $HOST -o %T | grep -Eq 'idle|mixed|alloc'"
}

healthy() {
  running munged && running mariadbd && running slurmdbd && running slurmctld && running slurmd || return 1
  scontrol ping >/dev/null 2>&1 || return 1
  sinfo -h -n "$HOST" -o %T 2>/dev/null | grep -Eq 'idle|mixed|alloc' || return 1
  sacctmgr -n show cluster >/dev/null 2>&1 || return 1
  [ "$(scontrol show config | sed -n 's/^MaxArraySize *= *//p')" = "$MAX_ARRAY" ] || return 1
  [ "$(scontrol show node "$HOST" | sed -n 's/.*CPUTot=\([0-9]*\).*/\1/p')" = "$CPUS" ] || return 1
}

if [ "${1:-}" = "--check" ]; then
  healthy && { say "healthy ($SLURM_CONF)"; exit 0; }
  say "not running or not healthy ($SLURM_CONF)"; exit 1
fi
lock_cluster
refuse_beside_a_system_slurm
if healthy; then say "already up (MaxArraySize=$MAX_ARRAY, CPUs=$CPUS; SLURM_CONF=$SLURM_CONF)"; exit 0; fi
install_packages
make_dirs
# slurm.conf first: sacctmgr reads it to find slurmdbd.
SLURM_CONF_CHANGED=0
write_slurm_conf && SLURM_CONF_CHANGED=1
start_munge
start_mariadb
start_slurmdbd
start_slurm
healthy || die "cluster did not become healthy"
say "up: node $HOST, $CPUS CPUs, MaxArraySize=$MAX_ARRAY, accounting cluster $CLUSTER"
say "use it with SLURM_CONF=$SLURM_CONF"
