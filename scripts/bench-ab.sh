#!/usr/bin/env bash
# Compares builds on this machine, whose speed drifts by a third over minutes: alternates short ledger-bench
# runs of each build (a fresh cluster each), then prints the median of each column per build.
#   scripts/bench-ab.sh [--clients N] [--runs N] [--duration S] DIR [DIR...]
# Each DIR holds a `coordinator` and a `participant` binary (e.g. a copy of an older target/release).
# Example: cp target/release/{coordinator,participant} /tmp/before; (change, build); 
#          scripts/bench-ab.sh --clients 1 --runs 6 /tmp/before target/release
set -euo pipefail
cd "$(dirname "$0")/.."
clients=64 runs=4 duration=3
while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
        --clients) clients=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        *) echo "bench-ab.sh: unknown flag $1" >&2; exit 2 ;;
    esac
done
[[ $# -ge 1 ]] || { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
cargo build --release --quiet -p loadgen --bin ledger-bench
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for _ in $(seq "$runs"); do
    for dir in "$@"; do
        out=$(LEDGER_BIN_DIR=$dir target/release/ledger-bench --clients "$clients" --duration "$duration" --warmup 1 2>/dev/null)
        row=$(grep -E '^ +[0-9]+ ' <<<"$out" | head -n 1)
        cpu=$(grep 'CPU µs' <<<"$out" | sed -E 's/.*coordinator ([0-9]+), p0 ([0-9]+), p1 ([0-9]+), bench ([0-9]+) \(all ([0-9]+).*/\1 \2 \3 \4 \5/')
        echo "$dir $(awk '{print $2, $6, $7}' <<<"$row") $cpu" >>"$results"
    done
done
echo "medians of $runs runs, $clients clients, ${duration} s each"
printf '%-28s %11s %7s %7s | %s\n' build committed/s "p50 ms" "p99 ms" "CPU µs per transfer: coord p0 p1 bench all"
for dir in "$@"; do
    medians=()
    for col in 2 3 4 5 6 7 8 9; do
        medians+=("$(grep "^$dir " "$results" | awk -v c="$col" '{print $c}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')")
    done
    printf '%-28s %11s %7s %7s | %s %s %s %s %s\n' "$dir" "${medians[@]}"
done
