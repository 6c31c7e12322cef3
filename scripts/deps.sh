#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: Debian's chromium, for the console's browser test.
set -euo pipefail
if command -v "${CHROMIUM:-chromium}" >/dev/null 2>&1; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "deps: installing chromium (apt-get)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
