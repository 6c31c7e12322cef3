#!/usr/bin/env bash
# A tour of the public API against a running cluster (start one with scripts/cluster.sh up). Prints every
# request and response, and checks each status: exits 1 if any differs from the expected one.
#
#   LEDGER_URL    the coordinator (default http://127.0.0.1:7100)
#   LEDGER_TOKEN  an admin API token, if the coordinator runs with --api-tokens-file
#
# Account names get a date-and-random suffix, so the demo can run again on the same data.
set -euo pipefail

URL=${LEDGER_URL:-http://127.0.0.1:7100}
URL=${URL%/}
command -v curl >/dev/null || { echo "demo.sh: curl is required" >&2; exit 1; }
HAVE_JQ=0
command -v jq >/dev/null && HAVE_JQ=1
AUTH=()
[ -z "${LEDGER_TOKEN:-}" ] || AUTH=(-H "Authorization: Bearer $LEDGER_TOKEN")

BODY_FILE=$(mktemp)
trap 'rm -f "$BODY_FILE"' EXIT
FAILURES=0
STEP=0
STATUS=
BODY=

reason_phrase() {
    case $1 in
        200) echo OK ;; 201) echo Created ;; 400) echo "Bad Request" ;; 401) echo Unauthorized ;;
        403) echo Forbidden ;; 404) echo "Not Found" ;; 409) echo Conflict ;;
        422) echo "Unprocessable Entity" ;; 503) echo "Service Unavailable" ;; 000) echo "no answer" ;;
        *) echo "" ;;
    esac
}

pretty() {
    if [ "$HAVE_JQ" = 1 ] && jq . <<<"$1" >/dev/null 2>&1; then
        jq . <<<"$1" | sed 's/^/    /'
    else
        printf '    %s\n' "$1"
    fi
}

# A top-level field of a JSON object (a string or a number); jq if present, else a plain pattern match.
field() {
    if [ "$HAVE_JQ" = 1 ]; then
        jq -r --arg f "$2" '.[$f] // empty' <<<"$1" 2>/dev/null || true
    else
        sed -n "s/.*\"$2\":\"\{0,1\}\([^\",}]*\).*/\1/p" <<<"$1" | head -n 1
    fi
}

section() {
    STEP=$((STEP + 1))
    printf '\n== %d. %s\n' "$STEP" "$1"
}

# call METHOD PATH EXPECTED_STATUS [JSON_BODY]: prints the exchange; leaves STATUS and BODY set.
call() {
    local method=$1 path=$2 expected=$3 body=${4:-} args=()
    printf '\n  > %s %s\n' "$method" "$path"
    if [ -n "$body" ]; then
        pretty "$body"
        args=(-H 'Content-Type: application/json' --data-binary "$body")
    fi
    STATUS=$(curl -sS -o "$BODY_FILE" -w '%{http_code}' --max-time 15 -X "$method" ${AUTH[@]+"${AUTH[@]}"} \
        ${args[@]+"${args[@]}"} "$URL$path" 2>/dev/null) || STATUS=000
    BODY=$(cat "$BODY_FILE")
    if [ "$STATUS" = "$expected" ]; then
        printf '  < %s %s   (expected %s: ok)\n' "$STATUS" "$(reason_phrase "$STATUS")" "$expected"
    else
        printf '  < %s %s   (expected %s: UNEXPECTED)\n' "$STATUS" "$(reason_phrase "$STATUS")" "$expected"
        FAILURES=$((FAILURES + 1))
    fi
    [ -z "$BODY" ] || pretty "$BODY"
}

# Reports a check on the answers themselves (not only the status).
check() {
    if [ "$1" = "$2" ]; then
        printf '  check: %s = %s: ok\n' "$3" "$2"
    else
        printf '  check: %s is %s, expected %s: UNEXPECTED\n' "$3" "${1:-<missing>}" "$2"
        FAILURES=$((FAILURES + 1))
    fi
}

# The shard an account id lives on: FNV-1a (64-bit) of its bytes modulo the shard count, as in
# common/src/ledger.rs. Used only to pick two names on different shards; the server's answer is what is shown.
shard_of() {
    local id=$1 n=$2 h=-3750763034362895579 i c # 0xcbf29ce484222325 as a signed 64-bit integer
    for ((i = 0; i < ${#id}; i++)); do
        printf -v c '%d' "'${id:i:1}"
        h=$(((h ^ c) * 1099511628211))
    done
    echo $(((((h >> 1) & 0x7FFFFFFFFFFFFFFF) % n * 2 + (h & 1)) % n))
}

new_uuid() {
    if [ -r /proc/sys/kernel/random/uuid ]; then
        cat /proc/sys/kernel/random/uuid
    elif command -v uuidgen >/dev/null; then
        uuidgen | tr '[:upper:]' '[:lower:]'
    else
        od -An -N16 -tx1 /dev/urandom | tr -d ' \n' |
            sed -E 's/(.{8})(.{4}).(.{3}).(.{3})(.{12})/\1-\2-4\3-8\4-\5/'
    fi
}

echo "Ledger demo against $URL"
health=$(curl -s --max-time 5 "$URL/health") || {
    echo "demo.sh: no answer from $URL/health. Start a cluster with scripts/cluster.sh up (or set LEDGER_URL)." >&2
    exit 1
}
shards=$(grep -o '"shard":' <<<"$health" | wc -l)
[ "$shards" -ge 1 ] || shards=1

suffix=$(date +%Y%m%d-%H%M%S)-$RANDOM
alice=alice-$suffix
bob=bob-$suffix
if [ "$shards" -ge 2 ]; then
    # Pick bob's name so the transfer crosses shards (a two-phase commit with two participants).
    n=0
    while [ "$(shard_of "$bob" "$shards")" = "$(shard_of "$alice" "$shards")" ]; do
        n=$((n + 1))
        bob=bob-$suffix-$n
    done
fi

section "Create two accounts (admin route): alice with 1000, bob with 100 (minor units, e.g. cents)"
call POST /accounts 201 "{\"id\":\"$alice\",\"balance\":1000}"
call POST /accounts 201 "{\"id\":\"$bob\",\"balance\":100}"

section "Read them back: each lives on the shard its id hashes to"
call GET "/accounts/$alice" 200
alice_shard=$(field "$BODY" shard)
call GET "/accounts/$bob" 200
bob_shard=$(field "$BODY" shard)
if [ -n "$alice_shard" ] && [ "$alice_shard" != "$bob_shard" ]; then
    echo "  alice is on shard $alice_shard, bob on shard $bob_shard: transfers between them are cross-shard."
else
    echo "  alice and bob share shard ${alice_shard:-?} (the cluster has $shards shard(s)):" \
        "the transfer involves one participant."
fi

transfer_id=$(new_uuid)
section "A cross-shard transfer of 250 from alice to bob, with a client-chosen id (the idempotency key)"
call POST /transfers 200 "{\"id\":\"$transfer_id\",\"from\":\"$alice\",\"to\":\"$bob\",\"amount\":250}"
first_answer=$BODY
check "$(field "$BODY" status)" committed "status"

section "Insufficient funds: bob tries to send 1000000; aborted, nothing moves"
call POST /transfers 422 "{\"from\":\"$bob\",\"to\":\"$alice\",\"amount\":1000000}"
check "$(field "$BODY" reason)" insufficient_funds "reason"

section "Retry the first transfer with the same id and body (as a client would after a timeout)"
call POST /transfers 200 "{\"id\":\"$transfer_id\",\"from\":\"$alice\",\"to\":\"$bob\",\"amount\":250}"
if [ "$BODY" = "$first_answer" ]; then
    echo "  check: the answer is the same as the first time: ok"
else
    echo "  check: the answer differs from the first one: UNEXPECTED"
    FAILURES=$((FAILURES + 1))
fi
echo "  Balances: the 250 moved exactly once."
call GET "/accounts/$alice" 200
check "$(field "$BODY" balance)" 750 "alice's balance"
call GET "/accounts/$bob" 200
check "$(field "$BODY" balance)" 350 "bob's balance"

section "Idempotency conflict: the same id with a different body"
call POST /transfers 409 "{\"id\":\"$transfer_id\",\"from\":\"$alice\",\"to\":\"$bob\",\"amount\":999}"

section "Bad request: an amount of zero"
call POST /transfers 400 "{\"from\":\"$alice\",\"to\":\"$bob\",\"amount\":0}"

section "Look the transfer up by id"
call GET "/transfers/$transfer_id" 200
check "$(field "$BODY" status)" committed "status"

section "Transfers in doubt: decisions some shard has not acknowledged yet (normally none)"
call GET "/transactions?status=in_doubt" 200

section "Health: the coordinator and every participant it can reach"
call GET /health 200

echo
if [ "$FAILURES" -eq 0 ]; then
    echo "Demo finished: every answer was as expected."
else
    echo "Demo finished with $FAILURES unexpected answer(s)." >&2
    exit 1
fi
