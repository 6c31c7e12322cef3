#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the protocol simulator and model check, and the integration tests
# that start the real binaries (the launcher builds them first, so no separate build step is needed), and the
# console's test in headless Chromium (installed by scripts/deps.sh when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo test --workspace "$@"
