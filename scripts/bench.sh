#!/usr/bin/env bash
# Throughput benchmark against a local cluster it starts itself: coordinator + 2 participants from the release
# build, fresh temp data dirs, RUST_LOG=warn for the nodes. Flags pass through to ledger-bench:
#   --clients N (64)  --duration SECONDS (10)  --warmup SECONDS (1)  --sweep 1,16,64,256  --accounts-per-shard N (1000)
#   --no-fsync        NOT DURABLE: nodes skip every fsync; every output line is labelled so.
#   --history 100000,1000000   history mode: per history size, each node's data dir bytes per committed
#                     transfer, restart time (SIGKILL, start, /health 200) and RSS after restart and after load.
# Progress goes to stderr, results to stdout; the load average is printed before and after. Exit 1 means money
# was not conserved.
# Example: scripts/bench.sh --sweep 1,16,64,256 --duration 5
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec target/release/ledger-bench "$@"
