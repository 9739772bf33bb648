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
