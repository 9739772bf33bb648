#!/usr/bin/env bash
# Debian's rsync for cluster.multihost.code_sync=rsync (launchers/hosts; tests in
# tests/hosts/test_multihost_code_env.py: the namespace hosts share this file system, so
# the remote rsync is this binary too). Idempotent: does nothing when rsync is on PATH.
# Needs root and apt-get otherwise.
set -euo pipefail
if command -v rsync >/dev/null; then
  exit 0
fi
command -v apt-get >/dev/null || { echo "[hosts] ERROR: rsync missing and no apt-get; install rsync" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "[hosts] ERROR: rsync missing; run as root: apt-get install rsync" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends rsync >&2 \
  || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends rsync >&2; }
command -v rsync >/dev/null || { echo "[hosts] ERROR: apt-get installed rsync but it is not on PATH" >&2; exit 1; }
