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
bash "$(dirname "$0")/apt-install.sh" install-orthanc.sh orthanc orthanc-dicomweb
have_orthanc && echo "installed $(Orthanc --version 2>/dev/null | head -1 || echo orthanc) with its DICOMweb plugin"
