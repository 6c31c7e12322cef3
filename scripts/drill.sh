#!/usr/bin/env bash
# The kill-and-restart drill on a cluster of its own: `ledger drill` (--duration, --clients, --accounts,
# --participants, --seed, --nemesis-interval-ms). Example: scripts/drill.sh --duration 600
exec "$(dirname "$0")/ledger" drill "$@"
