#!/usr/bin/env bash
# HTTP load bench: POST /v1/check with a 10-rule policy against GET /healthz of the same
# server, same machine, same run; prints both rates and their ratio.
#   bench/http_load.sh [seconds] [connections] [policy file] [rounds] [warm-up seconds]
# (defaults: 2 s per endpoint and round, 32 connections, bench/policy-10-rules.yaml, 10 rounds,
# 5 s of warm-up checks)
# With bench/policy-empty.yaml it measures the floor: the HTTP and JSON cost of a check
# whose decision does nothing.
#
# Both endpoints are warmed first, the check long enough to reach every one of the
# 100,000 users once: a check of a user seen before is the steady state (the first one
# also creates the user's counters). Then each round measures /healthz and then
# /v1/check for `seconds`. This machine is shared: the same endpoint's rate moves by a
# third from one 6-second run to the next (the server's CPU time per /healthz request
# too, so it is the machine, not the server). Short rounds, alternated, let both endpoints
# see the same spells of slowness; the figure is the median of the rounds' ratios, with
# the ratio of the totals beside it. Each line also gives the server's own CPU time per
# request (from /proc), the part of the cost a change to the server moves, as user + system
# time: the system part is mostly loopback TCP, including waking wrk for each response.
# After the ratios comes the server's CPU per request over all rounds, and their ratio,
# which leaves wrk's CPU out (see docs/ARCHITECTURE.md for what it does not leave out).
# The last line gives the server's resident memory before and after the rounds: with
# bench/policy-empty.yaml, what a check leaves behind apart from the ledger.
#
# wrk runs as SCHED_BATCH (WRK_SCHED=normal runs it as an ordinary thread). On 2 cores the
# load generator and the server take turns on the same CPUs, and the trivial request is
# built by the same Lua code so that the client's cost per request is the same for both
# endpoints. Under the default policy it is not: when the server is the slower side, as
# it is for checks, wrk runs out of work, sleeps, and is woken by the next response, about
# every other check (0.49 sleeps per check against 0.03-0.05 per /healthz), and on waking
# preempts the server worker that is running. wrk then spends 6.0 µs of CPU per check
# against 5.1 per /healthz. A batch thread gets the same share of the CPU but does not
# preempt anyone when it wakes, so it finds several responses waiting: 4.6-5.4 µs per
# request for both endpoints. The server's own CPU per request is about the same either
# way (see docs/ARCHITECTURE.md, nineteenth session).
# Each round prints the server's involuntary context switches per request ("preempted")
# and wrk's own CPU time per request.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-2}"
conns="${2:-32}"
policy="${3:-bench/policy-10-rules.yaml}"
rounds="${4:-10}"
warm="${5:-5}"

if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian package)" >&2
  (apt-get install -y wrk || (apt-get update && apt-get install -y wrk)) >/dev/null
fi
sched="${WRK_SCHED:-batch}"
case "$sched" in
  batch)
    command -v chrt >/dev/null || { echo "chrt (util-linux) is missing: install it, or set WRK_SCHED=normal" >&2; exit 2; }
    wrk=(chrt --batch 0 wrk)
    ;;
  normal) wrk=(wrk) ;;
  *)
    echo "WRK_SCHED is batch or normal, not \`$sched\`" >&2
    exit 2
    ;;
esac
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

# The server's CPU time so far, in clock ticks: user, then system.
cpu_ticks() { awk '{print $14, $15}' "/proc/$pid/stat"; }
ticks_per_sec="$(getconf CLK_TCK)"

# The server's involuntary context switches so far, over all its threads.
preemptions() { cat /proc/"$pid"/task/*/status 2>/dev/null | awk '/^nonvoluntary_ctxt_switches/ { n += $2 } END { print n + 0 }'; }

# run <script> <seconds>: prints "<req/s> <requests> <server CPU µs per request, unrounded>
# <user µs> <system µs> <server involuntary context switches per request>
# <wrk's CPU µs per request>".
run() {
  local before after switches client TIMEFORMAT='%U %S'
  before="$(cpu_ticks)"
  switches="$(preemptions)"
  client="$({ time "${wrk[@]}" -t2 -c"$conns" -d"$2s" -s "$1" "http://$addr" >"$data/wrk.out"; } 2>&1)"
  after="$(cpu_ticks)"
  switches="$(($(preemptions) - switches))"
  awk -v b="$before" -v a="$after" -v t="$ticks_per_sec" -v c="$switches" -v w="$client" '
    /requests in/ { n = $1 }
    /Requests\/sec/ { r = $2 }
    END {
      split(b, x, " "); split(a, y, " "); split(w, z, " ")
      u = (y[1] - x[1]) / t / n * 1e6; s = (y[2] - x[2]) / t / n * 1e6
      printf "%.0f %d %.4f %.4f %.4f %.2f %.1f\n", r, n, u + s, u, s, c / n, (z[1] + z[2]) / n * 1e6
    }' "$data/wrk.out"
}

echo "warming up" >&2
run "$data/trivial.lua" 2 >/dev/null
read -r _ warm_requests _ < <(run "$data/check.lua" "$warm")
if [ "$warm_requests" -lt 100000 ]; then
  echo "note: the warm-up checked $warm_requests requests, fewer than the 100,000 users" >&2
fi

# The server's resident memory, in kB: what it keeps per request shows as growth.
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$pid/status"; }
rss_start="$(rss_kb)"

ratios=()
trivial_total=0
check_total=0
trivial_cpu_total=0
check_cpu_total=0
for round in $(seq "$rounds"); do
  read -r trivial trivial_n trivial_cpu trivial_user trivial_sys trivial_cs trivial_wrk < <(run "$data/trivial.lua" "$secs")
  read -r check check_n check_cpu check_user check_sys check_cs check_wrk < <(run "$data/check.lua" "$secs")
  trivial_total=$((trivial_total + trivial_n))
  check_total=$((check_total + check_n))
  trivial_cpu_total="$(awk -v t="$trivial_cpu_total" -v c="$trivial_cpu" -v n="$trivial_n" 'BEGIN { print t + c * n }')"
  check_cpu_total="$(awk -v t="$check_cpu_total" -v c="$check_cpu" -v n="$check_n" 'BEGIN { print t + c * n }')"
  ratio="$(awk -v a="$check" -v b="$trivial" 'BEGIN { printf "%.2f", a / b }')"
  ratios+=("$ratio")
  printf 'round %d: GET /healthz %6d req/s (server %4.1f µs CPU/req: %3.1f user + %3.1f sys, %.2f preempted; wrk %3.1f µs)   POST /v1/check %6d req/s (server %4.1f µs: %3.1f + %3.1f, %.2f; wrk %3.1f)   ratio %s\n' \
    "$round" "$trivial" "$trivial_cpu" "$trivial_user" "$trivial_sys" "$trivial_cs" "$trivial_wrk" "$check" "$check_cpu" "$check_user" "$check_sys" "$check_cs" "$check_wrk" "$ratio"
done
echo
echo "POST /v1/check: $policy, 100,000 users, $conns connections, ${secs}s per endpoint and round, wrk $sched"
median="$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END { printf "%.2f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')"
echo "ratio check / trivial: median $median of $rounds rounds (${ratios[*]})"
awk -v a="$check_total" -v b="$trivial_total" 'BEGIN { printf "ratio of the totals: %.2f (%d checks, %d trivial requests)\n", a / b, a, b }'
# The ratio of the server's own CPU time per request, without wrk's.
awk -v tc="$trivial_cpu_total" -v tn="$trivial_total" -v cc="$check_cpu_total" -v cn="$check_total" 'BEGIN {
  printf "server CPU per request: /healthz %.1f µs, check %.1f µs (ratio %.2f)\n", tc / tn, cc / cn, (tc / tn) / (cc / cn)
}'
awk -v a="$rss_start" -v b="$(rss_kb)" -v n="$((check_total + trivial_total))" 'BEGIN {
  printf "server RSS: %.1f MB after the warm-up, %.1f MB after the rounds (%+.1f bytes per request)\n", a / 1024, b / 1024, (b - a) * 1024 / n
}'
