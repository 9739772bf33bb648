#!/usr/bin/env bash
# Stop the test cluster's daemons and wait until they are gone (packages and data stay).
set -uo pipefail
stop() {  # stop NAME [command to stop it]
  local name=$1; shift
  pgrep -x "$name" >/dev/null || return 0
  if [ $# -gt 0 ]; then "$@" >/dev/null 2>&1 || pkill -x "$name"; else pkill -x "$name"; fi
  for _ in $(seq 100); do pgrep -x "$name" >/dev/null || { echo "[slurm-down] stopped $name"; return 0; }; sleep 0.1; done
  pkill -9 -x "$name"; echo "[slurm-down] killed $name"
}
stop slurmd
stop slurmctld
stop slurmdbd
stop mariadbd mysqladmin --protocol=socket shutdown
stop munged
exit 0
