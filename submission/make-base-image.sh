#!/bin/sh
# Build a minimal Debian bookworm base image with Python 3.11 + venv, without Docker Hub.
#
#   submission/make-base-image.sh [--force] [TAG]        (default TAG: lapsam-base:bookworm)
#
# debootstrap (variant minbase) fetches the packages from a Debian mirror (DEBIAN_MIRROR,
# default http://deb.debian.org/debian) into a temporary root file system, which is trimmed
# (apt lists and caches, docs, man pages, locales) and then `docker import`ed. If TAG already
# exists, nothing is done unless --force is given. Needs root (debootstrap) and a Docker engine.
# Use the result with `lapsam submission build --base-image TAG`.
set -eu

TAG="lapsam-base:bookworm"
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "make-base-image.sh: unknown option $arg" >&2; exit 2 ;;
        *) TAG="$arg" ;;
    esac
done
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if ! docker info >/dev/null 2>&1; then
    echo "make-base-image.sh: no Docker engine answers (docker info failed); start dockerd first" >&2
    exit 1
fi
if [ "$FORCE" -eq 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "make-base-image.sh: $TAG already exists (use --force to rebuild)"
    exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "make-base-image.sh: debootstrap not found (apt-get install debootstrap)" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "make-base-image.sh: debootstrap needs root (run it with sudo)" >&2
    exit 1
fi

WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/lapsam-rootfs.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT INT TERM
ROOTFS="$WORK/rootfs"

echo "make-base-image.sh: debootstrap $SUITE (minbase + python3, python3-venv) from $MIRROR"
start=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    echo "make-base-image.sh: debootstrap failed; last lines of its log:" >&2
    tail -n 20 "$WORK/debootstrap.log" >&2
    exit 1
}

# Trim what a runtime image never reads.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
    "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
# The image's apt sources point at the same mirror (for anyone extending it).
echo "deb $MIRROR $SUITE main" >"$ROOTFS/etc/apt/sources.list"

tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "lapsam offline base: debian $SUITE minbase + python3 + python3-venv" \
    - "$TAG" >/dev/null

version="$(docker run --rm --network none "$TAG" python3 -c 'import sys, venv; print(sys.version.split()[0])')"
size="$(docker image inspect --format '{{.Size}}' "$TAG")"
echo "make-base-image.sh: built $TAG (python $version, $((size / 1000000)) MB) in $(($(date +%s) - start)) s"
