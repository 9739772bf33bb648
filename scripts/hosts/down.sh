#!/usr/bin/env bash
# Stop the test SSH hosts started by up.sh (by their pid files; nothing else is touched).
# The state dir, the test users and their keys are kept, so the next up.sh is quick.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"
[ -d "$HOSTS_DIR" ] || exit 0
lock_hosts
for h in "${HOST_NAMES[@]}"; do
  pid=$(our_pid "$h") || continue
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do alive "$pid" || break; sleep 0.05; done
  alive "$pid" && kill -9 "$pid" 2>/dev/null || true
  echo "[hosts] stopped $h (pid $pid)" >&2
done
# Namespace hosts: every one up.sh recorded (ns/<host>), whatever EMBEDFLEET_NS_HOSTS says
# now: its sshd by its pid file, then its veth and namespace; the bridge once none is left.
if [ -d "$HOSTS_DIR/ns" ]; then
  for rec in "$HOSTS_DIR"/ns/n*; do
    [ -e "$rec" ] || continue
    h=$(basename "$rec")
    if pid=$(our_pid "$h"); then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do alive "$pid" || break; sleep 0.05; done
      alive "$pid" && kill -9 "$pid" 2>/dev/null || true
      echo "[hosts] stopped $h (pid $pid)" >&2
    fi
    ip link del "$(veth_of "$h")" 2>/dev/null || true
    ip netns del "$(ns_of "$h")" 2>/dev/null || true
    rm -f "$rec"
  done
  if [ -e "$HOSTS_DIR/ns/bridge" ]; then
    ip link del "$NS_BRIDGE" 2>/dev/null || true
    rm -f "$HOSTS_DIR/ns/bridge"
  fi
fi
