#!/usr/bin/env bash
# Build a local Python 3.11 base image (Debian bookworm) for the Dockerfile's BASE_IMAGE, where no
# container registry is reachable (python:3.11-slim cannot be pulled). Needs root, debootstrap and a
# running Docker engine; takes about a minute. Usage: scripts/base-image.sh [TAG]
#   then: BASE_IMAGE=TAG docker-compose build   (default TAG: imgsearch-base:3.11-bookworm)
# The machine's CA bundle is copied in and PIP_CERT set, so pip inside the image trusts what the host
# trusts (a proxy's own CA, say).
set -euo pipefail

TAG="${1:-imgsearch-base:3.11-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "$TAG exists"
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "base-image.sh: debootstrap needs root" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "base-image.sh: apt-get install debootstrap" >&2; exit 2; }
[ -f "$CA_BUNDLE" ] || { echo "base-image.sh: no CA bundle at $CA_BUNDLE" >&2; exit 2; }

ROOTFS="$(mktemp -d /tmp/imgsearch-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
# python3.11-venv's own dependencies are named: debootstrap does not resolve the virtual ones.
debootstrap --variant=minbase \
    --include=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,python3-pip-whl,python3-setuptools-whl,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >/dev/null
cp "$CA_BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "$TAG" >/dev/null
echo "$TAG built"
