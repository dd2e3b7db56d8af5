#!/usr/bin/env bash
# Builds a Debian bookworm base image with debootstrap and tags it locally,
# for machines that can reach a Debian package mirror but no container
# registry. The images' Dockerfiles take it as BASE_IMAGE; it stands in for
# docker.io/library/debian:bookworm-slim.
#
#   deploy/images/debian-base.sh [TAG]        (default fedpilot/debian-base:bookworm)
#
# Environment: DEBIAN_MIRROR (default: the first Debian mirror in this
# machine's apt sources, else http://deb.debian.org/debian), FEDPILOT_CACHE
# (default /var/cache/fedpilot: the root filesystem tarball is kept there and
# re-imported when the image is missing), ENGINE (podman or docker).
# Needs root (debootstrap), debootstrap and the engine.
set -euo pipefail
TAG="${1:-fedpilot/debian-base:bookworm}"
ENGINE="${ENGINE:-podman}"
CACHE="${FEDPILOT_CACHE:-/var/cache/fedpilot}"
TARBALL="$CACHE/debian-bookworm-minbase.tar"

if "$ENGINE" image exists "$TAG" 2>/dev/null; then
  echo "base image $TAG present"
  exit 0
fi

apt_mirror() {
  local uri
  uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
          /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -oE '(https?|file)://[^ ]+/debian/?' | grep -v security | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

if [ ! -s "$TARBALL" ]; then
  MIRROR="${DEBIAN_MIRROR:-$(apt_mirror)}"
  echo "debootstrap bookworm from $MIRROR (a few minutes, once)"
  mkdir -p "$CACHE"
  ROOTFS=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$ROOTFS"' EXIT
  debootstrap --variant=minbase --include=ca-certificates bookworm "$ROOTFS" "$MIRROR" \
    > "$CACHE/debootstrap.log" 2>&1 \
    || { tail -n 30 "$CACHE/debootstrap.log"; exit 1; }
  # What debian:bookworm-slim also does: no package caches or lists in the image.
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  tar --numeric-owner -C "$ROOTFS" -cf "$TARBALL.part" .
  mv "$TARBALL.part" "$TARBALL"
fi
"$ENGINE" import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$TARBALL" "$TAG" >/dev/null
echo "base image $TAG imported from $TARBALL"
