#!/usr/bin/env bash
# Build a local Debian base image with debootstrap + `docker import`, for machines without a
# container registry. The images in docker/ build FROM it via --build-arg BASE_IMAGE=...
#
# What it is: Debian (bookworm by default) minbase + python3 (3.11) + venv + ca-certificates,
# with the host's CA bundle copied in (so pip inside the build trusts what the host trusts,
# e.g. a TLS-intercepting proxy), docs/man/locales/apt caches removed. About 150 MB.
# What it is not: a general-purpose image; there is no apt index inside (lists are dropped).
#
# Usage: scripts/build_base_image.sh [IMAGE_TAG]        (default nanoserve/debian-python:bookworm)
# Env:   SUITE (bookworm), MIRROR (the host's apt mirror, else deb.debian.org), FORCE=1 to rebuild.
# Idempotent: exits at once when the tag already exists (unless FORCE=1). Needs root + docker.
set -euo pipefail

IMAGE_TAG="${1:-nanoserve/debian-python:bookworm}"
SUITE="${SUITE:-bookworm}"

host_mirror() {
    # The first deb URI the host's apt uses (deb822 or one-line format), so the build uses the
    # same (possibly local or snapshot) mirror the host does.
    local uri=""
    if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
        uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources)
    fi
    if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
            /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR="${MIRROR:-$(host_mirror)}"

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$IMAGE_TAG" >/dev/null 2>&1; then
    echo "build_base_image: $IMAGE_TAG exists (FORCE=1 rebuilds)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "build_base_image: debootstrap missing (apt-get install debootstrap)" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "build_base_image: debootstrap needs root" >&2; exit 2; }

ROOTFS=$(mktemp -d /tmp/nanoserve-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

echo "build_base_image: debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 ||
    { tail -30 "$ROOTFS.log" >&2; exit 1; }
rm -f "$ROOTFS.log"

if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
fi
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
    "$ROOTFS"/usr/share/locale/* "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/* 2>/dev/null || true

tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE_TAG"
docker image ls "$IMAGE_TAG"
