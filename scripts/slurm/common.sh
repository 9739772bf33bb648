# Sourced by up.sh and down.sh: where the private test cluster lives and how to find the
# daemons it started. Nothing here reads or writes outside $SLURM_DIR.
#
#   EMBEDFLEET_SLURM_DIR        its directory: config, state, munge key and sockets, MariaDB
#                               datadir, pid and log files (default /tmp/embedfleet-slurm)
#   EMBEDFLEET_SLURM_PORT_BASE  first of its four TCP ports: slurmctld, slurmd, slurmdbd,
#                               MariaDB (default 6917; SLURM's own defaults are 6817-6819)

SLURM_DIR_GIVEN=${EMBEDFLEET_SLURM_DIR:+1}
SLURM_DIR=${EMBEDFLEET_SLURM_DIR:-/tmp/embedfleet-slurm}
case "$SLURM_DIR" in
  /*) ;;
  *) echo "[slurm] ERROR: EMBEDFLEET_SLURM_DIR must be an absolute path, not '$SLURM_DIR'" >&2; exit 1 ;;
esac
# slurm.conf has no quoting: a path with blanks would be read as two words.
if [[ "$SLURM_DIR" =~ [[:space:]] ]]; then
  echo "[slurm] ERROR: EMBEDFLEET_SLURM_DIR must not contain blanks: '$SLURM_DIR'" >&2; exit 1
fi
SLURM_DIR=${SLURM_DIR%/}
PORT_BASE=${EMBEDFLEET_SLURM_PORT_BASE:-6917}
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))

# Every client and daemon finds its configuration (and slurmdbd.conf beside it) here.
export SLURM_CONF=$SLURM_DIR/slurm.conf
RUN_DIR=$SLURM_DIR/run
LOG_DIR=$SLURM_DIR/log
STATE_DIR=$SLURM_DIR/state
MUNGE_DIR=$SLURM_DIR/munge
MUNGE_KEY=$MUNGE_DIR/etc/munge.key
MUNGE_SOCKET=$MUNGE_DIR/run/munge.socket
DB_DATADIR=$SLURM_DIR/mysql
DB_RUN=$SLURM_DIR/mysqld
DB_SOCKET=$DB_RUN/mysqld.sock

pid_file() {  # pid_file NAME: where NAME's pid is recorded
  case "$1" in
    munged) echo "$MUNGE_DIR/run/munged.pid" ;;
    mariadbd) echo "$DB_RUN/mariadbd.pid" ;;
    *) echo "$RUN_DIR/$1.pid" ;;
  esac
}

our_pid() {  # our_pid NAME: the recorded pid of NAME if that process is alive and is NAME
  local f pid
  f=$(pid_file "$1")
  [ -s "$f" ] || return 1
  pid=$(tr -dc '0-9' <"$f")
  [ -n "$pid" ] && alive "$pid" "$1" || return 1
  echo "$pid"
}

running() { our_pid "$1" >/dev/null; }

mysql_() { mysql --no-defaults --protocol=socket --socket="$DB_SOCKET" "$@"; }
mysqladmin_() { mysqladmin --no-defaults --protocol=socket --socket="$DB_SOCKET" "$@"; }

alive() {  # alive PID NAME: PID is a live (not zombie) process called NAME
  [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
  [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

stop_ours() {  # stop_ours NAME: TERM the recorded pid of NAME, then KILL that pid after 10 s
  local pid
  pid=$(our_pid "$1") || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    alive "$pid" "$1" || { echo "[slurm] stopped $1 (pid $pid)"; return 0; }
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  echo "[slurm] killed $1 (pid $pid)"
}

# One up.sh/down.sh at a time per cluster (pytest-xdist workers start it together). The
# lock is fd 9: every daemon is started with 9>&-, or it would hold the lock for its life.
lock_cluster() {
  mkdir -p -m 0755 "$SLURM_DIR"
  # Daemons run as root from files in here: nobody else may plant or change them.
  if [ "$(stat -c %u "$SLURM_DIR")" != 0 ] || [ -n "$(find "$SLURM_DIR" -maxdepth 0 -perm /022)" ]; then
    echo "[slurm] ERROR: $SLURM_DIR must be owned by root and writable by root only: choose another EMBEDFLEET_SLURM_DIR" >&2
    exit 1
  fi
  exec 9>>"$SLURM_DIR/.lock"
  flock -w 300 9 || {
    echo "[slurm] ERROR: $SLURM_DIR/.lock held for 5 min (another up.sh/down.sh?): holders: $(fuser "$SLURM_DIR/.lock" 2>&1)" >&2
    exit 1
  }
}
