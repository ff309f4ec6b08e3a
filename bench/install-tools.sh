#!/usr/bin/env bash
# Installs what the load bench (benches/load/) drives, from Debian's
# packages: wrk (HTTP/1.1 load), h2load (HTTP/2 load), nginx 1.22 and
# HAProxy 2.6 to compare against, and redis-server for the shared-budget row. Their system services are not started:
# the bench runs them itself on loopback ports it picks.
set -euo pipefail
packages=(wrk nghttp2-client nginx-light haproxy redis-server)
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ ${#missing[@]} -eq 0 ]; then
    echo "bench tools present: ${packages[*]}"
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# Keep package scripts from starting nginx/haproxy services on port 80.
policy=/usr/sbin/policy-rc.d
created_policy=false
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    created_policy=true
fi
trap '[ "$created_policy" = true ] && $sudo rm -f "$policy"' EXIT
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
