#!/usr/bin/env bash
# The status page as a person sees it: runs the demo (fake Coupa + proxy),
# sends a mix of calls — a legacy integration reading and writing
# invoices (403: no write scope), a tool with a local OAuth token — and
# has headless Chromium take a screenshot of the page with the migration
# view and its per-minute charts.
#
#   bench/status-screenshot.sh [out.png]    (default target/status.png)
#
# Needs curl and chromium (apt-get install chromium curl).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/status.png}
for tool in curl chromium; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install $tool" >&2; exit 1; }
done

cargo build --quiet --bin coupa-auth-proxy
log=$(mktemp)
target/debug/coupa-auth-proxy demo --listen 127.0.0.1:0 --admin 127.0.0.1:0 >"$log" 2>/dev/null &
demo=$!
trap 'kill $demo 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 100); do grep -q "Ctrl-C" "$log" && break; sleep 0.1; done
proxy=$(awk '$1 == "proxy" && $2 ~ /^http/ { print $2 }' "$log")
admin=$(awk '$1 == "status" && $2 ~ /^http/ { print $2 }' "$log")
for _ in $(seq 100); do curl -sf "${admin}readyz" >/dev/null && break; sleep 0.1; done

key=0123456789abcdef0123456789abcdef01234567
for i in $(seq 40); do
  curl -s -o /dev/null -H "X-COUPA-API-KEY: $key" "$proxy/api/invoices/$i?fields=id"
  curl -s -o /dev/null -H "X-COUPA-API-KEY: $key" "$proxy/api/suppliers?offset=$((i % 3 * 50))"
done
for i in $(seq 5); do
  curl -s -o /dev/null -X PUT -H "X-COUPA-API-KEY: $key" "$proxy/api/invoices/$i"
done
token=$(curl -s -u demo-tool:demo-tool-secret -d grant_type=client_credentials "$proxy/oauth2/token" \
  | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
for i in $(seq 25); do
  curl -s -o /dev/null -H "Authorization: Bearer $token" "$proxy/api/departments?limit=1"
done

mkdir -p "$(dirname "$out")"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --window-size=1280,1700 --screenshot="$out" "$admin" 2>/dev/null
echo "wrote $out"
