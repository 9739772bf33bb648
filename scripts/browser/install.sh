#!/usr/bin/env bash
# Debian's chromium for the report's browser tests (tests/e2e/test_report_browser.py),
# driven headless by Playwright with executable_path (its own browser download cannot
# work offline). Idempotent: does nothing when $EMBEDFLEET_CHROMIUM (default
# /usr/bin/chromium) is already there. Needs root and apt-get otherwise.
set -euo pipefail
CHROMIUM="${EMBEDFLEET_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
command -v apt-get >/dev/null || { echo "[browser] ERROR: $CHROMIUM missing and no apt-get; install chromium (or set EMBEDFLEET_CHROMIUM)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "[browser] ERROR: $CHROMIUM missing; run as root: apt-get install chromium" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends chromium >&2 \
  || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends chromium >&2; }
[ -x "$CHROMIUM" ] || { echo "[browser] ERROR: apt-get installed chromium but $CHROMIUM is not there" >&2; exit 1; }
