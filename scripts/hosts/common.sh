# Sourced by up.sh and down.sh: where the private test SSH hosts live and how to find the
# sshd daemons they run. Nothing here reads or writes outside $HOSTS_DIR, except the two
# test users (useradd) and /run/sshd (sshd's privilege-separation directory).
#
#   EMBEDFLEET_HOSTS_DIR    its directory: per-host sshd config, host key, pid and log,
#                           the client key, known_hosts, authorized keys, a data dir and
#                           hosts.env (default /tmp/embedfleet-hosts)
#   EMBEDFLEET_HOSTS_PORT   the port every host listens on, each on its own loopback
#                           address (default 2222)
#   EMBEDFLEET_NS_HOSTS     how many network-namespace hosts n1..nN to start as well
#                           (default 3; 0: none), each an sshd in its own namespace
#   EMBEDFLEET_NS_SUBNET    their private /24, as its first three octets (default 10.77.0):
#                           the bridge efbr0 is .1, host nI is .(10+I)
#
# Hosts: h1 on 127.0.0.2, h2 on 127.0.0.3 (Linux routes all of 127/8 to lo). Users:
# eftest (password and key, shell access) and efsftp (the same key and password, but
# ForceCommand internal-sftp: SFTP only, no exec).
#
# Namespace hosts nI (the multi-host launcher's tests and bench): network namespace
# efns-nI, a veth pair efv-nI (on the bridge efbr0, here) / eth0 (inside it), address
# $NS_SUBNET.(10+I) on a /24 that only the bridge and the namespaces have, and an sshd
# started with `ip netns exec` on it; besides the two test users it takes root by key
# (EF_NS_USER), so that tasks can run this machine's venv. `ip link set efv-nI down` cuts a host off (ssh then
# fails with 255); up.sh brings it back.

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
NS_COUNT=${EMBEDFLEET_NS_HOSTS:-3}
NS_SUBNET=${EMBEDFLEET_NS_SUBNET:-10.77.0}
if ! [[ "$NS_COUNT" =~ ^[0-9]+$ ]] || [ "$NS_COUNT" -gt 200 ]; then
  echo "[hosts] ERROR: EMBEDFLEET_NS_HOSTS must be a number from 0 to 200, not '$NS_COUNT'" >&2; exit 1
fi
if ! [[ "$NS_SUBNET" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]]; then
  echo "[hosts] ERROR: EMBEDFLEET_NS_SUBNET must be three octets such as 10.77.0, not '$NS_SUBNET'" >&2; exit 1
fi
NS_BRIDGE=efbr0
NS_HOST_NAMES=()
for ((i = 1; i <= NS_COUNT; i++)); do
  NS_HOST_NAMES+=("n$i")
  HOST_ADDR[n$i]=$NS_SUBNET.$((10 + i))
done
ns_of() { echo "efns-$1"; }    # ns_of nI: its network namespace
veth_of() { echo "efv-$1"; }   # veth_of nI: its veth end on the bridge (here)
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
