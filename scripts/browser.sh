#!/usr/bin/env bash
# Debian's Chromium for the dashboard's browser tests (Playwright's own browser download is not used:
# the tests point Playwright at this executable). Safe to re-run; does nothing when it is installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
echo "chromium installed: $(chromium --version)"
