#!/usr/bin/env bash
# (A copy of ../shared/tools/sid-root.sh, so that CI on a clean clone has it.)
# Makes (once) a Debian sid root holding today's Nix and Guix: nix-bin (2.34.8 when written:
# nix, nix-build, nix-store, nix-daemon, ...) and guix (1.5.0: the guix client and guix-daemon).
# Prints the root's directory. Needs root and Debian's package archive, nothing else.
#
#   ROOT=$(.ci/sid-root.sh)          # default /var/tmp/sid-root, or $SID_ROOT
#   chroot "$ROOT" nix --version                 # run today's client or daemon inside it
#
# A chroot cannot create user namespaces, so a sandboxed daemon must run outside it: bind-mount
# its socket's directory and its store into the root at the same paths for a client inside.
# /proc and /dev (recursively, for /dev/pts) are mounted into the root on every call.
set -euo pipefail
ROOT=${SID_ROOT:-/var/tmp/sid-root}
mirror() { # the Debian archive this machine already uses
  sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1
}
mounts() {
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/dev" || mount --rbind /dev "$ROOT/dev"
}
if [ ! -x "$ROOT/usr/bin/nix-daemon" ] || [ ! -x "$ROOT/usr/bin/guix" ]; then
  command -v debootstrap >/dev/null || { apt-get update -qq; apt-get install -y -qq debootstrap >/dev/null; }
  if [ ! -e "$ROOT/etc/debian_version" ]; then
    debootstrap --variant=minbase sid "$ROOT" "$(mirror)" >/dev/null
  fi
  mounts
  chroot "$ROOT" bash -c 'DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nix-bin guix >/dev/null && apt-get clean'
fi
mounts
echo "$ROOT"
