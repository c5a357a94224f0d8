#!/usr/bin/env bash
# HTTP load bench: POST /v1/check with a 10-rule policy against GET /healthz of the same
# server, same machine, same run; prints both rates and their ratio.
#   bench/http_load.sh [seconds] [connections] [policy file]
# With bench/policy-empty.yaml it measures the floor: the HTTP and JSON cost of a check
# whose decision does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
conns="${2:-32}"
policy="${3:-bench/policy-10-rules.yaml}"

if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian package)" >&2
  (apt-get install -y wrk || (apt-get update && apt-get install -y wrk)) >/dev/null
fi
cargo build --release --bin tollgate >/dev/null

data="$(mktemp -d)"
target/release/tollgate serve --config "$policy" --data-dir "$data" --listen 127.0.0.1:0 >"$data/out" 2>"$data/err" &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 50); do grep -q "listening on" "$data/out" 2>/dev/null && break; sleep 0.1; done
addr="$(sed -n 's/^listening on //p' "$data/out")"

cp bench/check.lua "$data/check.lua"

# The trivial request is built by the same Lua code (same per-request client cost on this
# 2-core machine, where wrk shares the CPU with the server); only the endpoint differs.
sed -e 's|"POST", "/v1/check"|"GET", "/healthz"|' "$data/check.lua" >"$data/trivial.lua"

rate() { awk '/Requests\/sec/ {print $2}'; }
echo "warming up" >&2
wrk -t2 -c"$conns" -d2s "http://$addr/healthz" >/dev/null
trivial="$(wrk -t2 -c"$conns" -d"${secs}s" -s "$data/trivial.lua" "http://$addr" | tee /dev/stderr | rate)"
check="$(wrk -t2 -c"$conns" -d"${secs}s" -s "$data/check.lua" "http://$addr" | tee /dev/stderr | rate)"
echo
echo "GET /healthz   : $trivial req/s"
echo "POST /v1/check : $check req/s ($policy, 100,000 users)"
awk -v a="$check" -v b="$trivial" 'BEGIN { printf "ratio check / trivial: %.2f\n", a / b }'
