#!/usr/bin/env bash
# Builds a local stand-in for the Dockerfile's default base image
# (python:3.11-slim) with debootstrap: Debian bookworm + Debian's Python 3.11.
# Used where no registry can be reached (smoke.sh); elsewhere `podman build`
# or `docker build` pulls the real python:3.11-slim and this is not needed.
#
#   docker/build-base-image.sh [TAG]      (default docker.io/library/python:3.11-slim)
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian),
# PAD_DOCKER_WORK (scratch folder outside the repository, default /var/tmp/pad-docker).
set -euo pipefail

TAG="${1:-docker.io/library/python:3.11-slim}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WORK="${PAD_DOCKER_WORK:-/var/tmp/pad-docker}"
ROOTFS="$WORK/rootfs-bookworm"

if [ "$(id -u)" -ne 0 ]; then
    echo "build-base-image.sh: debootstrap needs root" >&2
    exit 1
fi

rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
echo "build-base-image.sh: debootstrap bookworm into $ROOTFS"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    tail -20 "$WORK/debootstrap.log" >&2
    exit 1
}

# Slim it like the official -slim images: no apt lists, docs, man pages or caches.
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
    "$ROOTFS"/var/log/*.log "$ROOTFS"/var/cache/debconf/*-old
find "$ROOTFS"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +
# apt inside the image keeps working (apt-get update fetches the lists again).
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
    "$MIRROR" "$MIRROR" >"$ROOTFS/etc/apt/sources.list"

tar --numeric-owner -C "$ROOTFS" -c . |
    podman import --quiet \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        - "$TAG" >/dev/null
rm -rf "$ROOTFS"
echo "build-base-image.sh: $TAG ($(podman run --rm "$TAG" python3 --version))"
