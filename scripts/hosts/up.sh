#!/usr/bin/env bash
# Start the test SSH hosts (real OpenSSH sshd, one per loopback address), idempotently,
# and print the path of hosts.env, which tests read (hosts, port, users, key, known_hosts).
#
#   scripts/hosts/up.sh            start what is not running (installs openssh-server if
#                                  /usr/sbin/sshd is missing and apt-get is there), print
#                                  the env file's path
#   scripts/hosts/up.sh --check    exit 0 when every host answers, 1 otherwise
#   scripts/hosts/up.sh --env      print the env file's path only
#   EMBEDFLEET_NS_HOSTS=32 scripts/hosts/up.sh   also namespace hosts n1..n32 (default 3)
# Needs root (sshd switches to the test users; namespaces). See common.sh for the layout.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

answers() {  # answers HOST: its sshd is ours, alive, and speaks SSH on its address
  our_pid "$1" >/dev/null || return 1
  timeout 5 bash -c "exec 3<>/dev/tcp/${HOST_ADDR[$1]}/$HOSTS_PORT && head -c 4 <&3" 2>/dev/null \
    | grep -q '^SSH-'
}

check_all() {
  local h
  for h in "${HOST_NAMES[@]}" "${NS_HOST_NAMES[@]}"; do answers "$h" || return 1; done
  [ -s "$ENV_FILE" ] && grep -qx "EF_NS_HOSTS_NAMES=\"${NS_HOST_NAMES[*]}\"" "$ENV_FILE"
}

ns_network() {  # ns_network HOST: its namespace, veth pair and address (idempotent)
  local h=$1 ns veth
  ns=$(ns_of "$h"); veth=$(veth_of "$h")
  mkdir -p -m 0755 "$HOSTS_DIR/ns"
  if ! ip link show "$NS_BRIDGE" >/dev/null 2>&1; then
    ip link add "$NS_BRIDGE" type bridge
    ip addr add "$NS_SUBNET.1/24" dev "$NS_BRIDGE"
    : >"$HOSTS_DIR/ns/bridge"
  fi
  ip link set "$NS_BRIDGE" up
  [ -e "/run/netns/$ns" ] || ip netns add "$ns"
  : >"$HOSTS_DIR/ns/$h"  # recorded before anything else of it exists: down.sh removes it
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip -n "$ns" link del eth0 2>/dev/null || true
    ip link add "$veth" type veth peer name "efp-$h"
    ip link set "efp-$h" netns "$ns"
    ip -n "$ns" link set "efp-$h" name eth0
    ip -n "$ns" addr add "${HOST_ADDR[$h]}/24" dev eth0
    ip link set "$veth" master "$NS_BRIDGE"
  fi
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
  ip link set "$veth" up  # also brings back a host cut off with `ip link set VETH down`
}

case "${1:-}" in
  --env) echo "$ENV_FILE"; exit 0 ;;
  --check) check_all; exit $? ;;
  "") ;;
  *) echo "usage: $0 [--check|--env]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
  echo "[hosts] ERROR: up.sh needs root (sshd logs in as the test users); run it with sudo" >&2
  exit 1
fi
lock_hosts
if check_all; then echo "$ENV_FILE"; exit 0; fi

if [ ! -x "$SSHD" ]; then
  command -v apt-get >/dev/null || { echo "[hosts] ERROR: $SSHD missing; install openssh-server" >&2; exit 1; }
  echo "[hosts] installing openssh-server" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server >&2 \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server >&2; }
fi
mkdir -p -m 0755 /run/sshd
mkdir -p -m 0700 "$CLIENT_DIR"
mkdir -p -m 0755 "$AUTH_KEYS_DIR"
mkdir -p -m 1777 "$DATA_DIR"
chmod 1777 "$DATA_DIR"

for user in "$TEST_USER" "$SFTP_USER"; do
  if ! id "$user" >/dev/null 2>&1; then
    useradd -m -s /bin/bash "$user"
  fi
  echo "$user:$TEST_PASSWORD" | chpasswd
done
[ -s "$CLIENT_KEY" ] || ssh-keygen -q -t ed25519 -N '' -C embedfleet-test -f "$CLIENT_KEY"
for user in "$TEST_USER" "$SFTP_USER"; do
  install -m 0644 "$CLIENT_KEY.pub" "$AUTH_KEYS_DIR/$user"
done
# Namespace hosts also take root by key: the launcher's tasks run the checkout's venv,
# whose interpreter lives under /root here (pyenv), which the test users cannot read.
install -m 0644 "$CLIENT_KEY.pub" "$AUTH_KEYS_DIR/root"

: >"$KNOWN_HOSTS.new"
for h in "${NS_HOST_NAMES[@]}"; do ns_network "$h"; done
for h in "${HOST_NAMES[@]}" "${NS_HOST_NAMES[@]}"; do
  d=$(host_dir "$h")
  mkdir -p -m 0700 "$d"
  [ -s "$d/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C "$h" -f "$d/ssh_host_ed25519_key"
  cat >"$d/sshd_config" <<CFG
# The embedfleet test host $h (scripts/hosts/up.sh); not a system sshd.
Port $HOSTS_PORT
ListenAddress ${HOST_ADDR[$h]}
HostKey $d/ssh_host_ed25519_key
PidFile $d/sshd.pid
AuthorizedKeysFile $AUTH_KEYS_DIR/%u
# The state dir lives under /tmp (world-writable), which StrictModes refuses.
StrictModes no
PasswordAuthentication yes
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
PermitRootLogin $([[ "$h" == n* ]] && echo prohibit-password || echo no)
AllowUsers $TEST_USER $SFTP_USER$([[ "$h" == n* ]] && echo " root")
Subsystem sftp internal-sftp
MaxStartups 64:30:128
MaxSessions 64
LogLevel VERBOSE
Match User $SFTP_USER
    ForceCommand internal-sftp
    AllowTcpForwarding no
CFG
  "$SSHD" -t -f "$d/sshd_config"
  if ! our_pid "$h" >/dev/null; then
    if [[ "$h" == n* ]]; then
      ip netns exec "$(ns_of "$h")" "$SSHD" -f "$d/sshd_config" -E "$d/sshd.log" 8>&-
    else
      "$SSHD" -f "$d/sshd_config" -E "$d/sshd.log" 8>&-
    fi
  fi
  echo "[${HOST_ADDR[$h]}]:$HOSTS_PORT $(cut -d' ' -f1,2 "$d/ssh_host_ed25519_key.pub")" >>"$KNOWN_HOSTS.new"
done
mv "$KNOWN_HOSTS.new" "$KNOWN_HOSTS"
chmod 0644 "$KNOWN_HOSTS"

for _ in $(seq 100); do
  ok=1
  for h in "${HOST_NAMES[@]}" "${NS_HOST_NAMES[@]}"; do answers "$h" || ok=0; done
  [ "$ok" = 1 ] && break
  sleep 0.05
done
for h in "${HOST_NAMES[@]}" "${NS_HOST_NAMES[@]}"; do
  answers "$h" || { echo "[hosts] ERROR: sshd of $h did not start; see $(host_dir "$h")/sshd.log:" >&2; tail -20 "$(host_dir "$h")/sshd.log" >&2 || true; exit 1; }
done

{
  echo "EF_HOSTS_DIR=$HOSTS_DIR"
  echo "EF_HOSTS_NAMES=\"${HOST_NAMES[*]}\""
  for h in "${HOST_NAMES[@]}"; do echo "EF_HOST_$h=${HOST_ADDR[$h]}"; done
  echo "EF_NS_HOSTS_NAMES=\"${NS_HOST_NAMES[*]}\""
  for h in "${NS_HOST_NAMES[@]}"; do
    echo "EF_HOST_$h=${HOST_ADDR[$h]}"
    echo "EF_NS_$h=$(ns_of "$h")"
    echo "EF_VETH_$h=$(veth_of "$h")"
  done
  echo "EF_HOSTS_PORT=$HOSTS_PORT"
  echo "EF_HOSTS_USER=$TEST_USER"
  echo "EF_NS_USER=root"
  echo "EF_HOSTS_SFTP_USER=$SFTP_USER"
  echo "EF_HOSTS_PASSWORD=$TEST_PASSWORD"
  echo "EF_HOSTS_KEY=$CLIENT_KEY"
  echo "EF_HOSTS_KNOWN_HOSTS=$KNOWN_HOSTS"
  echo "EF_HOSTS_DATA=$DATA_DIR"
} >"$ENV_FILE.tmp"
mv "$ENV_FILE.tmp" "$ENV_FILE"
echo "[hosts] up: ${HOST_NAMES[*]} ${NS_HOST_NAMES[*]} on port $HOSTS_PORT (env: $ENV_FILE)" >&2
echo "$ENV_FILE"
