#!/bin/bash
# Base images for deploy/smoke.sh on a machine that reaches Debian's package mirror but no
# image registry: debootstrap Debian bookworm (Python 3.11, venv, pip) and import it under
# the tag the Dockerfile builds FROM, plus a PostgreSQL image honouring the official one's
# variables. Run as root (debootstrap, chroot); takes a few minutes. Run by hand, not in CI.
#
#   deploy/smoke-base.sh                 # python:3.11-slim and hashmesh-smoke/postgres:15
#   BASE_IMAGE=local/python:3.11 deploy/smoke-base.sh
#
# Settings: BASE_IMAGE, POSTGRES_IMAGE (tags to make), MIRROR (Debian mirror), WORK (scratch
# folder, default a fresh temporary one), ENGINE (docker or podman; default: whichever runs),
# CA_BUNDLE (a CA file to trust inside the images, e.g. a proxy's; default the host's).
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
POSTGRES_IMAGE=${POSTGRES_IMAGE:-hashmesh-smoke/postgres:15}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
WORK=${WORK:-$(mktemp -d /tmp/hashmesh-smoke-base.XXXXXX)}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
HERE=$(cd "$(dirname "$0")" && pwd)
if [ -z "${ENGINE:-}" ]; then
    if docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
say() { printf '[smoke-base %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

rootfs=$WORK/rootfs
if [ ! -x "$rootfs/usr/bin/python3" ]; then
    say "debootstrap bookworm into $rootfs"
    debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1
fi
# pip inside the build must trust what the host trusts (a TLS-intercepting proxy, say).
if [ -f "$CA_BUNDLE" ]; then
    cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
say "import $BASE_IMAGE"
tar -C "$rootfs" -c . | "$ENGINE" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null

pgroot=$WORK/rootfs-pg
if [ ! -x "$pgroot/usr/lib/postgresql/15/bin/postgres" ]; then
    say "add postgresql-15 in $pgroot"
    rm -rf "$pgroot"
    cp -a "$rootfs" "$pgroot"
    printf '#!/bin/sh\nexit 101\n' >"$pgroot/usr/sbin/policy-rc.d"  # no service starts
    chmod 0755 "$pgroot/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$pgroot/etc/resolv.conf"
    mount -t proc proc "$pgroot/proc"
    trap 'umount "$pgroot/proc" 2>/dev/null || true' EXIT
    chroot "$pgroot" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends postgresql-15' >"$WORK/postgres.log" 2>&1
    umount "$pgroot/proc"
    trap - EXIT
fi
say "import hashmesh-smoke/postgres-base:15, build $POSTGRES_IMAGE"
tar -C "$pgroot" -c . | "$ENGINE" import - hashmesh-smoke/postgres-base:15 >/dev/null
"$ENGINE" build -q -f "$HERE/smoke/postgres.Dockerfile" -t "$POSTGRES_IMAGE" "$HERE/smoke" >/dev/null
say "done: $BASE_IMAGE, $POSTGRES_IMAGE"
