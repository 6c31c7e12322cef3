#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the protocol simulator and model check, and the integration tests
# that start the real binaries (they need both binaries built first).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo test --workspace "$@"
