#!/usr/bin/env bash
# Installs Debian's Orthanc and its DICOMweb plugin (for tests/test_pacs.py, a real PACS for the
# DICOM node; skipped, not failed, without them) when they are missing. Idempotent and quiet;
# needs apt and root or sudo. The tests start their own Orthanc on free loopback ports with a
# configuration in a temporary folder: Debian's orthanc service (on 4242/8042, started by the
# package where the init system allows it) is neither used nor needed.
set -euo pipefail
have_orthanc() {
  { command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } &&
    compgen -G "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*" >/dev/null
}
have_orthanc && exit 0
command -v apt-get >/dev/null || { echo "install-orthanc.sh: no apt-get here" >&2; exit 1; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-orthanc.sh: need root or sudo to apt-get install orthanc" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null
have_orthanc && echo "installed $(Orthanc --version 2>/dev/null | head -1 || echo orthanc) with its DICOMweb plugin"
