#!/usr/bin/env bash
# apt-get install PACKAGE... quietly, as root or through sudo: what install-browser.sh and
# install-orthanc.sh share. Usage: bash scripts/apt-install.sh WHO PACKAGE... (WHO names the caller
# in the one-line error when there is neither root nor sudo, or no apt-get).
set -euo pipefail
who=$1; shift
command -v apt-get >/dev/null || { echo "$who: no apt-get here" >&2; exit 1; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "$who: need root or sudo to apt-get install $*" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq "$@" >/dev/null
