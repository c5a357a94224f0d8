#!/usr/bin/env bash
# The server's own (user-space) instructions per request, counted by callgrind: for
# GET /healthz and for POST /v1/check (the load bench's body, one user per request) with
# the 10-rule and the empty policy. Unlike req/s on this shared 2-core machine, the counts
# repeat from run to run, so a change to the check path shows as a number.
#   bench/http_instructions.sh [seconds per endpoint]
# TOLLGATE_BIN=<path> measures another build of the server (an A/B of a change).
# The kernel's share (sockets) and cache misses are not counted: see ARCHITECTURE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"

if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian package)" >&2
  (apt-get install -y wrk || (apt-get update && apt-get install -y wrk)) >/dev/null
fi
bin="${TOLLGATE_BIN:-target/release/tollgate}"
[ -n "${TOLLGATE_BIN:-}" ] || cargo build --release --bin tollgate >/dev/null

# One endpoint under callgrind: prints "<label> <requests> <instructions per request>".
measure() {
  local label="$1" policy="$2" endpoint="$3"
  local data
  data="$(mktemp -d)"
  # Counting starts once the server listens: start-up and policy loading are not counted.
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$data/cg.out" \
    "$bin" serve --config "$policy" --data-dir "$data" --listen 127.0.0.1:0 \
    >"$data/out" 2>"$data/err" &
  local pid=$!
  for _ in $(seq 300); do grep -q "listening on" "$data/out" 2>/dev/null && break; sleep 0.2; done
  local addr
  addr="$(sed -n 's/^listening on //p' "$data/out")"
  cp bench/check.lua "$data/check.lua"
  sed -e 's|"POST", "/v1/check"|"GET", "/healthz"|' "$data/check.lua" >"$data/healthz.lua"
  callgrind_control -i on "$pid" >/dev/null 2>&1
  local requests
  requests="$(wrk -t1 -c4 -d"${secs}s" -s "$data/$endpoint.lua" "http://$addr" | awk '/requests in/ {print $1}')"
  # Shutdown (dropping every counter) is not counted either.
  callgrind_control -i off "$pid" >/dev/null 2>&1
  kill -INT "$pid"
  wait "$pid" || true
  local total
  total="$(callgrind_annotate "$data/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')"
  printf '%-28s %8d requests %8d instructions/request\n' "$label" "$requests" "$((total / requests))"
  rm -rf "$data"
}

measure "GET /healthz" bench/policy-empty.yaml healthz
measure "POST /v1/check (empty)" bench/policy-empty.yaml check
measure "POST /v1/check (10 rules)" bench/policy-10-rules.yaml check
