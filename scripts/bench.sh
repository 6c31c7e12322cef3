#!/usr/bin/env bash
# The throughput benchmark on a cluster of its own: `ledger bench` (--clients, --duration, --sweep, --history,
# --no-fsync, ...; `scripts/bench.sh --help`). Example: scripts/bench.sh --sweep 1,16,64,256 --duration 5
exec "$(dirname "$0")/ledger" bench "$@"
