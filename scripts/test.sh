#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the protocol simulator and model check (optimised: see Cargo.toml),
# the integration tests that start the real binaries (the launcher builds them first, so no separate build step
# is needed), and the console's test in headless Chromium (installed by scripts/deps.sh when missing).
#
# Every test runs, whatever fails first, and the run ends with one summary: each test binary, what passed and
# what failed. The exit status is 0 only if everything passed. It uses cargo-nextest (installed when missing),
# which runs the test binaries side by side, one process per test; without it, `cargo test --no-fail-fast`.
# Extra arguments go to `cargo nextest run` (or `cargo test`) instead of --workspace, e.g. `scripts/test.sh -p
# coordinator`. LEDGER_TEST_RUNNER=cargo-test forces the plain cargo test run.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
scripts/deps.sh || exit 1

started=$SECONDS
target_dir=${CARGO_TARGET_DIR:-target}
selection=("$@")
if [ ${#selection[@]} -eq 0 ]; then
    selection=(--workspace)
fi

say() { echo "test.sh: $*" >&2; }

# cargo-nextest, from its prebuilt release if possible (seconds), else built from source (minutes).
ensure_nextest() {
    cargo nextest --version >/dev/null 2>&1 && return 0
    local bin="${CARGO_HOME:-$HOME/.cargo}/bin" platform=""
    case "$(uname -s)-$(uname -m)" in
        Linux-x86_64) platform=linux ;;
        Linux-aarch64) platform=linux-arm ;;
    esac
    if [ -n "$platform" ] && command -v curl >/dev/null 2>&1; then
        say "installing cargo-nextest into $bin (the prebuilt release from get.nexte.st)"
        mkdir -p "$bin"
        if curl -fLsS --max-time 120 "https://get.nexte.st/latest/$platform" | tar zxf - -C "$bin" &&
            cargo nextest --version >/dev/null 2>&1; then
            return 0
        fi
    fi
    say "building cargo-nextest from source (cargo install cargo-nextest --locked; a few minutes)"
    cargo install cargo-nextest --locked && cargo nextest --version >/dev/null 2>&1
}

# One line per test binary from nextest's JUnit report: name, passed and failed counts; then each failed test.
junit_summary() {
    awk '
        function attr(line, name,    m) {
            if (match(line, name "=\"[^\"]*\"")) return substr(line, RSTART + length(name) + 2, RLENGTH - length(name) - 3)
            return ""
        }
        /<testsuite / {
            suite = attr($0, "name"); failed = attr($0, "failures") + attr($0, "errors")
            ran = attr($0, "tests") - attr($0, "skipped")
            printf "  %-6s  %-28s %4d passed, %d failed\n", (failed ? "FAILED" : "ok"), suite, ran - failed, failed
        }
        /<testcase / { testcase = attr($0, "classname") " " attr($0, "name") }
        /<(failure|error)[ >]/ { failures[++n] = testcase }
        END { if (n) { print "  failed:"; for (i = 1; i <= n; i++) print "    " failures[i] } }
    ' "$1"
}

# The same from `cargo test` output: each "Running" binary and its "test result" line (none if it crashed).
cargo_test_summary() {
    awk '
        function flush() { if (binary != "") printf "  %-6s  %s: %s\n", verdict, binary, result; binary = "" }
        /^ +(Running|Doc-tests) / { flush(); binary = $0; sub(/^ +/, "", binary); verdict = "FAILED"; result = "no result (it crashed, or did not build)" }
        /^test result: / { verdict = ($3 == "ok.") ? "ok" : "FAILED"; result = $0; sub(/^test result: [A-Za-z]+\. /, "", result); flush() }
        END { flush() }
    ' "$1"
}

# True if a doc comment of the workspace holds a code block: a doctest.
has_doctests() {
    grep -rqE '^\s*//[/!].*```' --include='*.rs' common coordinator participant protocol migrations loadgen
}

failed=0
report=$(mktemp)
trap 'rm -f "$report"' EXIT
runner=cargo-test
if [ "${LEDGER_TEST_RUNNER:-}" != cargo-test ]; then
    if ensure_nextest; then
        runner=nextest
    else
        say "no cargo-nextest: running cargo test --no-fail-fast instead"
    fi
fi
if [ "$runner" = nextest ]; then
    junit="$target_dir/nextest/default/junit.xml"
    rm -f "$junit"
    cargo nextest run --config-file scripts/nextest.toml --no-fail-fast "${selection[@]}" || failed=1
    {
        echo "Test binaries (cargo nextest run ${selection[*]}):"
        if [ -f "$junit" ]; then
            junit_summary "$junit"
        else
            echo "  FAILED  nothing ran: the build failed (see above)"
        fi
    } >"$report"
    # Doc comments with code blocks are doctests, which nextest does not run (the workspace has none today).
    if [ $# -eq 0 ] && has_doctests; then
        log=$(mktemp)
        cargo test --doc --workspace 2>&1 | tee "$log" || failed=1
        cargo_test_summary "$log" >>"$report"
        rm -f "$log"
    fi
else
    # cargo test runs the doctests too.
    log=$(mktemp)
    cargo test --no-fail-fast "${selection[@]}" 2>&1 | tee "$log" || failed=1
    { echo "Test binaries (cargo test ${selection[*]}):"; cargo_test_summary "$log"; } >"$report"
    rm -f "$log"
fi

minutes=$(((SECONDS - started) / 60))
seconds=$(((SECONDS - started) % 60))
echo
cat "$report"
if [ "$failed" -eq 0 ]; then
    echo "test.sh: everything passed (${minutes} min ${seconds} s)"
else
    echo "test.sh: FAILED: see the failures above (${minutes} min ${seconds} s)"
fi
exit "$failed"
