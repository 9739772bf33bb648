#!/usr/bin/env bash
# Stop the test cluster's daemons (those whose pids up.sh recorded under
# EMBEDFLEET_SLURM_DIR, nothing else) and wait until they are gone; packages and the
# cluster's directory stay, so the next up.sh finds its accounting database again.
set -uo pipefail
# shellcheck source=scripts/slurm/common.sh
. "$(dirname "$0")/common.sh"
[ -d "$SLURM_DIR" ] || exit 0
lock_cluster
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  stop_ours "$name"
done
exit 0
