#!/usr/bin/env bash
# Install what tests/launch/test_slurm.py needs to run a real Slurm cluster on this machine:
# Debian's slurmctld, slurmd, slurm-client and munge (~20 s), plus iproute2 / util-linux for the
# network namespaces that play the two nodes.
#   tools/install_slurm.sh        # idempotent; a fast no-op when everything is installed
# Exits 0 without installing (and says why) where it cannot: not root, not Debian, or no apt-get.
# The packages' own services are not started: the test runs its own daemons, with its own key,
# socket and state under a temporary directory.
set -euo pipefail
need=(slurmctld slurmd slurm-client munge iproute2 util-linux)
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
why=""
[ "$(id -u)" -eq 0 ] || why="not root"
[ -z "$why" ] && { [ -r /etc/debian_version ] || why="not Debian"; }
[ -z "$why" ] && { command -v apt-get >/dev/null || why="no apt-get"; }
if [ -n "$why" ]; then
    echo "install_slurm: $why; not installing ${missing[*]} (tests/launch/test_slurm.py will skip)" >&2
    exit 0
fi
echo "install_slurm: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d (exit 101) keeps dpkg from starting the packaged munge/slurm services: they would
# read /etc/munge and /etc/slurm, which our throwaway cluster does not use.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
fi
cleanup() { [ "$created_policy" -eq 0 ] || rm -f "$policy"; }
trap cleanup EXIT
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "install_slurm: done" >&2
