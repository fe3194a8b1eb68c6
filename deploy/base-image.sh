#!/usr/bin/env bash
# A Debian base image with python3 built from Debian's packages, for machines that cannot
# pull from a registry: debootstrap (minbase, ~50 s), trimmed, then `podman import`.
# Usage: deploy/base-image.sh [IMAGE]   (default localhost/syncer-base:bookworm)
# Both images (syncer's and the database's) take it as their BASE build argument.
set -euo pipefail
image=${1:-localhost/syncer-base:bookworm}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}

if podman image exists "$image"; then
  echo "base image $image exists"
  exit 0
fi
root=$(mktemp -d /var/tmp/syncer-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$root" "$mirror" > "$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -f "$root.log"
# The downloaded packages, the package lists, docs, man pages and translations: 275 MB -> 133 MB.
for d in var/cache/apt var/lib/apt/lists usr/share/doc usr/share/man usr/share/info usr/share/locale; do
  rm -rf "${root:?}/$d"/*
done
tar -C "$root" -c . | podman import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' - "$image" > /dev/null
echo "base image $image imported"
