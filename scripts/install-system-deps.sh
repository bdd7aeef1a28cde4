#!/usr/bin/env bash
# Installs the Debian packages the relay's tests and demo use:
#   dcmtk                storescu / storescp / echoscu: the real DICOM peers (with TLS)
#   orthanc              Orthanc, a real PACS: a destination and a sender in the integration tests
#   nginx                the reverse proxy that stands in front of an InferenceServer in the field
#   libgdcm-tools        GDCM's gdcmscu: another real sender (C-ECHO, C-STORE) in the integration tests
#   dicom3tools          dciodvfy, which validates the objects the emulator's models produce
#   buildah, mmdebstrap  hack/image/build.sh builds the product image from the Dockerfile without
#                        a Docker engine; mmdebstrap makes its Python base image from Debian packages
#   prometheus           a real Prometheus scraping the relay, and promtool checking the chart's
#                        alerts (installed without its recommended node exporter: nothing uses it)
# Does nothing when they are present, so `make test` stays fast on a prepared machine.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v gdcmscu >/dev/null 2>&1 || need+=(libgdcm-tools)
need_lean=()
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need_lean+=(prometheus)
if [ ${#need[@]} -eq 0 ] && [ ${#need_lean[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "Installing Debian packages: ${need[*]} ${need_lean[*]}"
$SUDO apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ${#need_lean[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_lean[@]}" >/dev/null
fi
