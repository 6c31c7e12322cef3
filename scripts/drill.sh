#!/usr/bin/env bash
# Kill-and-restart drill against a local cluster it starts itself (release build, temp data dirs).
# Flags pass through to ledger-drill: --duration SECONDS (default 30), --clients, --accounts, --participants,
# --seed, --nemesis-interval-ms. Example: scripts/drill.sh --duration 600
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --workspace --bins
exec target/release/ledger-drill "$@"
