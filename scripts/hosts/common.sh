# Sourced by up.sh and down.sh: where the private test SSH hosts live and how to find the
# sshd daemons they run. Nothing here reads or writes outside $HOSTS_DIR, except the two
# test users (useradd) and /run/sshd (sshd's privilege-separation directory).
#
#   EMBEDFLEET_HOSTS_DIR    its directory: per-host sshd config, host key, pid and log,
#                           the client key, known_hosts, authorized keys, a data dir and
#                           hosts.env (default /tmp/embedfleet-hosts)
#   EMBEDFLEET_HOSTS_PORT   the port every host listens on, each on its own loopback
#                           address (default 2222)
#
# Hosts: h1 on 127.0.0.2, h2 on 127.0.0.3 (Linux routes all of 127/8 to lo). Users:
# eftest (password and key, shell access) and efsftp (the same key and password, but
# ForceCommand internal-sftp: SFTP only, no exec).

HOSTS_DIR=${EMBEDFLEET_HOSTS_DIR:-/tmp/embedfleet-hosts}
case "$HOSTS_DIR" in
  /*) ;;
  *) echo "[hosts] ERROR: EMBEDFLEET_HOSTS_DIR must be an absolute path, not '$HOSTS_DIR'" >&2; exit 1 ;;
esac
if [[ "$HOSTS_DIR" =~ [[:space:]] ]]; then  # sshd_config has no quoting for these paths
  echo "[hosts] ERROR: EMBEDFLEET_HOSTS_DIR must not contain blanks: '$HOSTS_DIR'" >&2; exit 1
fi
HOSTS_DIR=${HOSTS_DIR%/}
HOSTS_PORT=${EMBEDFLEET_HOSTS_PORT:-2222}
HOST_NAMES=(h1 h2)
declare -A HOST_ADDR=([h1]=127.0.0.2 [h2]=127.0.0.3)
TEST_USER=eftest
SFTP_USER=efsftp
# A test password for throwaway local accounts that only listen on loopback.
TEST_PASSWORD=ef-test-Pw-4c7e91
CLIENT_DIR=$HOSTS_DIR/client
CLIENT_KEY=$CLIENT_DIR/id_ed25519
KNOWN_HOSTS=$CLIENT_DIR/known_hosts
AUTH_KEYS_DIR=$HOSTS_DIR/authorized_keys
DATA_DIR=$HOSTS_DIR/data
ENV_FILE=$HOSTS_DIR/hosts.env
SSHD=${SSHD:-/usr/sbin/sshd}

host_dir() { echo "$HOSTS_DIR/$1"; }
pid_file() { echo "$HOSTS_DIR/$1/sshd.pid"; }

alive() {  # alive PID: a live (not zombie) sshd
  [ "$(cat "/proc/$1/comm" 2>/dev/null)" = sshd ] || return 1
  [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

our_pid() {  # our_pid HOST: the recorded pid of HOST's sshd if it is alive
  local f pid
  f=$(pid_file "$1")
  [ -s "$f" ] || return 1
  pid=$(tr -dc '0-9' <"$f")
  [ -n "$pid" ] && alive "$pid" || return 1
  echo "$pid"
}

# One up.sh/down.sh at a time (pytest-xdist workers may start it together). fd 8 is the
# lock: sshd is started with 8>&-, or it would hold the lock for its life.
lock_hosts() {
  mkdir -p -m 0755 "$HOSTS_DIR"
  exec 8>"$HOSTS_DIR/.lock"
  flock 8
}
