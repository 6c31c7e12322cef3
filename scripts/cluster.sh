#!/usr/bin/env bash
# A local cluster under ./data: `ledger cluster` (up [--participants N], down, status, kill <node>, start <node>,
# logs <node> [tail args], reset); `scripts/cluster.sh --help` says more.
LEDGER_COMMAND_NAME=scripts/cluster.sh exec "$(dirname "$0")/ledger" cluster "$@"
