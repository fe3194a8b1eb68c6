#!/usr/bin/env bash
# podman with runc (crun fails on this kind of machine's cgroups) and debootstrap, from
# Debian's packages, installed if missing: check.sh needs podman for podman-compose's
# parser, smoke.sh runs the containers. Sourced by both.
if ! command -v podman > /dev/null || ! command -v runc > /dev/null || ! command -v debootstrap > /dev/null; then
  echo "installing podman, runc, debootstrap (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap > /dev/null
fi
