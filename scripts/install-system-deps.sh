#!/usr/bin/env bash
# Installs the Debian packages the relay's tests and demo use:
#   dcmtk                storescu / storescp / echoscu: the real DICOM peers (with TLS)
#   orthanc              Orthanc, a real PACS: a destination and a sender in the integration tests
#   dicom3tools          dciodvfy, which validates the objects the emulator's models produce
#   buildah, mmdebstrap  hack/image/build.sh builds the product image from the Dockerfile without
#                        a Docker engine; mmdebstrap makes its Python base image from Debian packages
# Does nothing when they are present, so `make test` stays fast on a prepared machine.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "Installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
