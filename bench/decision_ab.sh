#!/usr/bin/env bash
# A/B of the criterion `decision` bench: the working tree against another revision, built
# side by side and run alternately (this machine's speed moves by a fifth within an hour,
# so two builds are only compared within one run of this script).
#   bench/decision_ab.sh <revision> [rounds=2] [measurement seconds=6]
# Prints the mean of each bench for each build and round, then the ratio per stateful rule
# (a 10-rule check over 4 stateful rules against the DashMap increment).
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:?usage: bench/decision_ab.sh <revision> [rounds] [seconds]}"
rounds="${2:-2}"
secs="${3:-6}"
work="$(mktemp -d)"
trap 'git worktree remove --force "$work/tree" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

# The bench executable of a tree: `cargo bench --no-run` names it on stderr.
bench_of() {
  local dir="$1" target="$2"
  (cd "$dir" && CARGO_TARGET_DIR="$target" cargo bench -p tollgate --bench decision --no-run 2>&1) |
    sed -n 's/.*Executable benches\/decision.rs (\(.*\))/\1/p' | tail -1
}

echo "building $rev and the working tree" >&2
git worktree add --detach -q "$work/tree" "$rev"
base="$(bench_of "$work/tree" "$work/target")"
new="$(bench_of . "$PWD/target")"
[ -n "$base" ] && [ -n "$new" ] || { echo "a build failed" >&2; exit 1; }
case "$base" in /*) ;; *) base="$work/tree/$base" ;; esac
case "$new" in /*) ;; *) new="$PWD/$new" ;; esac

benches=(baseline-dashmap-increment check-10-rules-1-thread baseline-dashmap-increment-2-threads check-10-rules-2-threads)
for round in $(seq "$rounds"); do
  for build in base new; do
    bin="$base"; [ "$build" = new ] && bin="$new"
    out="$work/criterion-$build"
    mkdir -p "$out"
    (cd "$out" && CRITERION_HOME="$out" "$bin" --bench --warm-up-time 3 --measurement-time "$secs" --noplot >/dev/null 2>&1)
    line="round $round $([ "$build" = base ] && echo "$rev" || echo "working tree"):"
    for b in "${benches[@]}"; do
      mean="$(python3 -c "import json,sys; print('%.1f' % json.load(open(sys.argv[1]))['mean']['point_estimate'])" "$out/decision/$b/new/estimates.json")"
      line="$line $b=${mean}ns"
    done
    ratio="$(python3 -c "import json,sys; f=lambda b: json.load(open('$out/decision/'+b+'/new/estimates.json'))['mean']['point_estimate']; print('%.1f' % (f('check-10-rules-1-thread') / 4 / f('baseline-dashmap-increment')))")"
    echo "$line  per-stateful-rule=${ratio}x"
  done
done
