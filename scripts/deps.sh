#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: Debian's chromium, for the console's browser
# test, and iproute2's `ip`, for the partition test's network namespace.
set -euo pipefail
need=()
command -v "${CHROMIUM:-chromium}" >/dev/null 2>&1 || need+=(chromium)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "deps: installing ${need[*]} (apt-get)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
