#!/usr/bin/env bash
# A local ledger cluster for trying things out and for recovery drills: one coordinator and N participants
# (shards) on loopback, started from the release build, with their data, logs and pid files under ./data.
#
#   scripts/cluster.sh up [--participants N]   build, start every node that is not running, wait for /health
#   scripts/cluster.sh down                     SIGTERM every node and wait for it to exit (data stays)
#   scripts/cluster.sh status                   which nodes run, and the coordinator's /health
#   scripts/cluster.sh kill <node>              SIGKILL one node (a crash, for recovery drills)
#   scripts/cluster.sh start <node>             start one node again with the same flags and data
#   scripts/cluster.sh logs <node> [tail args]  tail the node's log (default: last 50 lines; e.g. -f)
#   scripts/cluster.sh reset                    down, then delete ./data
#
# Nodes are named coordinator, p0, p1, ... Ports: coordinator = LEDGER_BASE_PORT (default 7100), pI = base+1+I.
# The layout (base port, participant count, node settings) is fixed by the first `up` and kept in
# data/cluster.env; later commands read it from there. LEDGER_* variables set at `up` (for example
# LEDGER_IN_DOUBT_AFTER_MS=500) reach every node and are remembered for `start`; LEDGER_CRASH_AT is never
# remembered: `LEDGER_CRASH_AT=participant.prepare.flushed scripts/cluster.sh start p0` arms it for that run.
# Waits are bounded: LEDGER_START_TIMEOUT_S (default 30) for /health, LEDGER_STOP_TIMEOUT_S (default 20) for
# an exit after SIGTERM (then SIGKILL, which loses nothing: every acknowledged write is already durable).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=data
ENV_FILE=$DATA/cluster.env
BIN_DIR=${CARGO_TARGET_DIR:-target}/release
START_TIMEOUT_S=${LEDGER_START_TIMEOUT_S:-30}
STOP_TIMEOUT_S=${LEDGER_STOP_TIMEOUT_S:-20}
# Variables that configure this script or are set per node by it, so never remembered as node settings.
NOT_NODE_SETTINGS=" LEDGER_BASE_PORT LEDGER_URL LEDGER_CRASH_AT LEDGER_LISTEN LEDGER_DATA LEDGER_SHARD \
LEDGER_PARTICIPANTS LEDGER_START_TIMEOUT_S LEDGER_STOP_TIMEOUT_S LEDGER_TOKEN LEDGER_BIN_DIR "

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

# ---- layout ---------------------------------------------------------------------------------------------------

BASE_PORT=
PARTICIPANTS=
NODE_SETTINGS=()

load_layout() {
    [ -f "$ENV_FILE" ] || return 1
    # shellcheck disable=SC1090
    source "$ENV_FILE"
    BASE_PORT=$CLUSTER_BASE_PORT
    PARTICIPANTS=$CLUSTER_PARTICIPANTS
    NODE_SETTINGS=("${CLUSTER_NODE_SETTINGS[@]}")
}

require_layout() {
    load_layout || die "no cluster in ./$DATA (no $ENV_FILE): run scripts/cluster.sh up first"
}

save_layout() {
    mkdir -p "$DATA"
    {
        echo "# Written by scripts/cluster.sh up on $(date -u +%Y-%m-%dT%H:%M:%SZ); read by every other command."
        echo "# The participant count is fixed for this data: the coordinator refuses another one."
        printf 'CLUSTER_BASE_PORT=%q\n' "$BASE_PORT"
        printf 'CLUSTER_PARTICIPANTS=%q\n' "$PARTICIPANTS"
        printf 'CLUSTER_NODE_SETTINGS=('
        local s
        for s in "${NODE_SETTINGS[@]}"; do printf ' %q' "$s"; done
        printf ' )\n'
    } >"$ENV_FILE"
}

nodes() {
    local i
    for ((i = 0; i < PARTICIPANTS; i++)); do echo "p$i"; done
    echo coordinator
}

port_of() {
    case $1 in
        coordinator) echo "$BASE_PORT" ;;
        p*) echo $((BASE_PORT + 1 + ${1#p})) ;;
    esac
}

url_of() { echo "http://127.0.0.1:$(port_of "$1")"; }

check_node() {
    local node=$1 i
    [ "$node" = coordinator ] && return 0
    for ((i = 0; i < PARTICIPANTS; i++)); do [ "$node" = "p$i" ] && return 0; done
    die "unknown node '$node': the nodes are $(nodes | tr '\n' ' ')"
}

participant_urls() {
    local i urls=()
    for ((i = 0; i < PARTICIPANTS; i++)); do urls+=("$(url_of "p$i")"); done
    (IFS=,; echo "${urls[*]}")
}

# The node's full command line, one word per line (the same every time, so `start` repeats `up`).
command_of() {
    local node=$1
    case $node in
        coordinator)
            printf '%s\n' "$BIN_DIR/coordinator" --listen "127.0.0.1:$(port_of coordinator)" \
                --data "$DATA/coordinator" --participants "$(participant_urls)"
            ;;
        p*)
            printf '%s\n' "$BIN_DIR/participant" --shard "${node#p}" --listen "127.0.0.1:$(port_of "$node")" \
                --data "$DATA/$node"
            ;;
    esac
}

# ---- processes ------------------------------------------------------------------------------------------------

pid_file() { echo "$DATA/$1.pid"; }
log_file() { echo "$DATA/$1.log"; }

pid_of() {
    local file
    file=$(pid_file "$1")
    [ -f "$file" ] && cat "$file" || true
}

# True if $2 is a live (not zombie) process of this node's binary: pids get reused.
pid_alive() {
    local node=$1 pid=$2 binary=participant state
    [ -n "$pid" ] || return 1
    [ "$node" = coordinator ] && binary=coordinator
    kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null || ps -o comm= -p "$pid" 2>/dev/null)" = "$binary" ] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo R)
    [ "$state" != Z ]
}

running() { pid_alive "$1" "$(pid_of "$1")"; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

health_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$(url_of "$1")/health" || true; }

log_tail() {
    local log
    log=$(log_file "$1")
    echo "---- last lines of $log ----" >&2
    tail -n "${2:-20}" "$log" >&2 2>/dev/null || echo "(no log)" >&2
    echo "----" >&2
}

# Starts one node in the background, detached from this shell, and records its pid.
spawn() {
    local node=$1 port cmd settings=() s name
    port=$(port_of "$node")
    if port_busy "$port"; then
        die "$node: port $port is already in use by another process (set LEDGER_BASE_PORT, or stop it)"
    fi
    mapfile -t cmd < <(command_of "$node")
    [ -x "${cmd[0]}" ] || die "${cmd[0]} is missing: run scripts/cluster.sh up (it builds) or cargo build --release"
    # Remembered settings apply unless the caller's environment sets the same variable now.
    local shown=()
    for s in "${NODE_SETTINGS[@]}"; do
        name=${s%%=*}
        if [ -n "${!name+x}" ]; then
            shown+=("$name=${!name}")
        else
            settings+=("$s")
            shown+=("$s")
        fi
    done
    mkdir -p "$DATA/$node"
    rm -f "$(pid_file "$node")"
    [ -z "${LEDGER_CRASH_AT:-}" ] || shown+=("LEDGER_CRASH_AT=$LEDGER_CRASH_AT")
    echo "==== $(date -u +%Y-%m-%dT%H:%M:%SZ) cluster.sh starting $node: ${shown[*]}${shown[*]:+ }${cmd[*]}" \
        >>"$(log_file "$node")"
    # The inner shell writes its own pid and then becomes the node (exec), so the pid file names the node.
    # setsid keeps the node out of this terminal's process group (Ctrl-C here does not reach it).
    local detach=()
    command -v setsid >/dev/null && detach=(setsid)
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner shell
    env "${settings[@]}" "${detach[@]}" bash -c 'echo $$ >"$1"; shift; exec "$@"' spawn "$(pid_file "$node")" \
        "${cmd[@]}" </dev/null >>"$(log_file "$node")" 2>&1 &
    # Wait until the inner shell has written the pid file and exec'd the binary (or died trying).
    local i pid
    for ((i = 0; i < 100; i++)); do
        pid=$(pid_of "$node")
        if [ -n "$pid" ]; then
            pid_alive "$node" "$pid" && return 0
            kill -0 "$pid" 2>/dev/null || return 0 # gone already: wait_healthy reports it with the log
        fi
        sleep 0.05
    done
    die "$node: did not start (no pid file, or not running the binary after 5 s)"
}

# Waits until the node answers GET /health with 200; fails early if the process dies.
wait_healthy() {
    local node=$1 deadline=$((SECONDS + START_TIMEOUT_S)) pid
    pid=$(pid_of "$node")
    while ((SECONDS < deadline)); do
        if ! pid_alive "$node" "$pid"; then
            rm -f "$(pid_file "$node")"
            echo "cluster.sh: $node (pid $pid) exited during start-up" >&2
            log_tail "$node"
            exit 1
        fi
        [ "$(health_code "$node")" = 200 ] && return 0
        sleep 0.2
    done
    echo "cluster.sh: $node (pid $pid) did not answer GET $(url_of "$node")/health with 200" \
        "within ${START_TIMEOUT_S}s; it is still running (scripts/cluster.sh logs $node; kill $node)" >&2
    log_tail "$node"
    exit 1
}

start_node() {
    local node=$1
    if running "$node"; then
        echo "$node is already running (pid $(pid_of "$node"))"
        return 0
    fi
    spawn "$node"
    wait_healthy "$node"
    printf '%-12s %-24s pid %-8s data %s\n' "$node" "$(url_of "$node")" "$(pid_of "$node")" "$DATA/$node"
}

stop_nodes() {
    local node pid pids=() names=() i deadline
    for node in "$@"; do
        pid=$(pid_of "$node")
        if pid_alive "$node" "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$node")
            echo "$node: SIGTERM sent (pid $pid)"
        else
            [ -f "$(pid_file "$node")" ] && echo "$node: not running (removing a stale pid file)"
            rm -f "$(pid_file "$node")"
        fi
    done
    deadline=$((SECONDS + STOP_TIMEOUT_S))
    for i in "${!pids[@]}"; do
        while pid_alive "${names[$i]}" "${pids[$i]}" && ((SECONDS < deadline)); do sleep 0.1; done
        if pid_alive "${names[$i]}" "${pids[$i]}"; then
            echo "${names[$i]}: still running ${STOP_TIMEOUT_S}s after SIGTERM; SIGKILL (its data is durable)" >&2
            kill -KILL "${pids[$i]}" 2>/dev/null || true
            while pid_alive "${names[$i]}" "${pids[$i]}"; do sleep 0.1; done
        fi
        echo "${names[$i]}: stopped"
        rm -f "$(pid_file "${names[$i]}")"
    done
}

# ---- commands -------------------------------------------------------------------------------------------------

cmd_up() {
    local want=
    while [ $# -gt 0 ]; do
        case $1 in
            --participants) [ $# -ge 2 ] || die "--participants needs a number"; want=$2; shift 2 ;;
            --participants=*) want=${1#*=}; shift ;;
            -h | --help) usage 0 ;;
            *) die "up: unknown argument '$1'" ;;
        esac
    done
    if [ -n "$want" ] && ! [[ $want =~ ^[1-9][0-9]*$ ]]; then
        die "--participants must be a whole number from 1"
    fi
    if load_layout; then
        if [ -n "$want" ] && [ "$want" != "$PARTICIPANTS" ]; then
            die "./$DATA was set up with $PARTICIPANTS participants, and the coordinator refuses another count" \
                "(accounts would map to other shards). Run scripts/cluster.sh reset first to start from scratch."
        fi
        if [ -n "${LEDGER_BASE_PORT:-}" ] && [ "$LEDGER_BASE_PORT" != "$BASE_PORT" ]; then
            die "./$DATA was set up with LEDGER_BASE_PORT=$BASE_PORT (participants remember the coordinator's" \
                "URL). Use that, or run scripts/cluster.sh reset first."
        fi
    else
        BASE_PORT=${LEDGER_BASE_PORT:-7100}
        if ! [[ $BASE_PORT =~ ^[0-9]+$ ]] || ((BASE_PORT < 1 || BASE_PORT + ${want:-2} > 65535)); then
            die "LEDGER_BASE_PORT must be a port number with room for the nodes after it"
        fi
        PARTICIPANTS=${want:-2}
        local name
        NODE_SETTINGS=()
        while IFS= read -r name; do
            [[ $NOT_NODE_SETTINGS == *" $name "* ]] && continue
            NODE_SETTINGS+=("$name=${!name}")
        done < <(compgen -e | grep '^LEDGER_' || true)
        save_layout
    fi

    local node to_start=()
    for node in $(nodes); do running "$node" || to_start+=("$node"); done
    if [ ${#to_start[@]} -eq 0 ]; then
        echo "The cluster is already running; nothing to do."
        cmd_status
        return 0
    fi
    if [ ${#to_start[@]} -lt $((PARTICIPANTS + 1)) ]; then
        echo "Some nodes are already running; starting only: ${to_start[*]}"
    else
        echo "Building (cargo build --release)..."
        cargo build --release --quiet || die "the build failed"
    fi
    echo "Starting (data in ./$DATA, logs in ./$DATA/<node>.log):"
    # Participants first: the coordinator checks on them, and its re-delivery starts at once.
    for node in "${to_start[@]}"; do start_node "$node"; done
    echo
    echo "Cluster up. Public API: $(url_of coordinator)   (try: scripts/demo.sh, or curl $(url_of coordinator)/health)"
    [ ${#NODE_SETTINGS[@]} -eq 0 ] || echo "Node settings: ${NODE_SETTINGS[*]}"
}

cmd_down() {
    if ! load_layout; then
        echo "No cluster in ./$DATA; nothing to stop."
        return 0
    fi
    # The coordinator first, so it stops sending work to participants that are going away.
    # shellcheck disable=SC2046
    stop_nodes coordinator $(nodes | grep -v '^coordinator$')
    [ "${1:-}" = --quiet ] || echo "Cluster down. Data kept in ./$DATA (scripts/cluster.sh reset deletes it)."
}

cmd_status() {
    require_layout
    local node pid state code all_up=0
    printf '%-12s %-24s %-8s %-14s %s\n' NODE URL PID PROCESS "GET /health"
    for node in $(nodes); do
        pid=$(pid_of "$node")
        if pid_alive "$node" "$pid"; then
            state=running
            code=$(health_code "$node")
        else
            state="not running"
            [ -n "$pid" ] && state="dead"
            code=-
            all_up=1
        fi
        printf '%-12s %-24s %-8s %-14s %s\n' "$node" "$(url_of "$node")" "${pid:--}" "$state" "$code"
    done
    echo
    echo "Coordinator GET /health:"
    local body
    if body=$(curl -s --max-time 3 "$(url_of coordinator)/health"); then
        if command -v jq >/dev/null; then jq . <<<"$body" 2>/dev/null || echo "$body"; else echo "$body"; fi
    else
        echo "(no answer from $(url_of coordinator))"
        all_up=1
    fi
    return $all_up
}

cmd_kill() {
    [ $# -eq 1 ] || die "usage: scripts/cluster.sh kill <node>"
    require_layout
    check_node "$1"
    local node=$1 pid
    pid=$(pid_of "$node")
    if ! pid_alive "$node" "$pid"; then
        rm -f "$(pid_file "$node")"
        echo "$node is not running."
        return 0
    fi
    kill -KILL "$pid"
    while pid_alive "$node" "$pid"; do sleep 0.05; done
    rm -f "$(pid_file "$node")"
    echo "$node: killed with SIGKILL (pid $pid). Bring it back with: scripts/cluster.sh start $node"
}

cmd_start() {
    [ $# -eq 1 ] || die "usage: scripts/cluster.sh start <node>"
    require_layout
    check_node "$1"
    [ -z "${LEDGER_CRASH_AT:-}" ] || echo "Crash point armed for this run of $1: LEDGER_CRASH_AT=$LEDGER_CRASH_AT"
    start_node "$1"
}

cmd_logs() {
    [ $# -ge 1 ] || die "usage: scripts/cluster.sh logs <node> [tail arguments, e.g. -f or -n 200]"
    require_layout
    check_node "$1"
    local log
    log=$(log_file "$1")
    shift
    [ -f "$log" ] || die "no log yet at $log"
    if [ $# -eq 0 ]; then set -- -n 50; fi
    exec tail "$@" "$log"
}

cmd_reset() {
    if load_layout; then cmd_down --quiet; fi
    if [ -d "$DATA" ]; then
        echo "Deleting ./$DATA:"
        find "$DATA" -mindepth 1 -maxdepth 1 -printf '  %p\n' | sort
        rm -rf -- "${ROOT:?}/$DATA"
        echo "Deleted."
    else
        echo "No ./$DATA to delete."
    fi
}

command -v curl >/dev/null || die "curl is required"
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
[ $# -ge 1 ] || usage
sub=$1
shift
case $sub in
    up) cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    kill) cmd_kill "$@" ;;
    start) cmd_start "$@" ;;
    logs) cmd_logs "$@" ;;
    reset) cmd_reset ;;
    -h | --help | help) usage 0 ;;
    *) echo "cluster.sh: unknown command '$sub'" >&2; usage ;;
esac
