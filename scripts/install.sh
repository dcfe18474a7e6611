#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs pneumoscope with its test extras.
# torch/torchvision are pinned to the pair that this workplace serves offline
# (torch 2.14.1 + torchvision 0.29.1 on x86_64, 2.9.1 + 0.24.1 on aarch64).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
case "$(uname -m)" in
  aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *)             TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
if ! .venv/bin/python -c "import pneumoscope, torch, torchvision" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.pneumoscope-installed ]; then
  .venv/bin/pip install -q $TORCH
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.pneumoscope-installed
fi
# Debian's Chromium for the browser test of the web page (skipped, not failed, without it)
bash scripts/install-browser.sh || echo "install.sh: no Chromium; tests/test_web_browser.py will skip" >&2
# Debian's Orthanc with its DICOMweb plugin, the real PACS of tests/test_pacs.py (skipped, not failed, without it)
bash scripts/install-orthanc.sh || echo "install.sh: no Orthanc; tests/test_pacs.py will skip" >&2
