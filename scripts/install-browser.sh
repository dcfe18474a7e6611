#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium and its driver (for tests/test_web_browser.py and
# benchmarks/screenshot.py) when they are missing. Idempotent and quiet; needs root or sudo.
# Playwright's own browser download is not used: it does not work offline.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-browser.sh: need root or sudo to apt-get install chromium" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
echo "installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
