#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium and its driver (for tests/test_web_browser.py and
# benchmarks/screenshot.py) when they are missing. Idempotent and quiet; needs root or sudo.
# Playwright's own browser download is not used: it does not work offline.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
bash "$(dirname "$0")/apt-install.sh" install-browser.sh chromium chromium-driver
echo "installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
