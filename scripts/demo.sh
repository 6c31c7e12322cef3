#!/usr/bin/env bash
# A tour of the public API against a running cluster (LEDGER_URL, default http://127.0.0.1:7100): `ledger demo`.
exec "$(dirname "$0")/ledger" demo "$@"
