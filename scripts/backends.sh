#!/usr/bin/env bash
# Starts three demo backends on 127.0.0.1:8001-8003 (named backend-8001..backend-8003) and stops them
# all on Ctrl-C (SIGINT), SIGTERM or exit. Works from any directory.
#
#   scripts/backends.sh [PORT...]     other ports than 8001 8002 8003, one backend each
#   BACKEND_BIN=path/to/backend       use this binary instead of building target/release/backend
set -euo pipefail

# A script started in the background by another script (`scripts/backends.sh &` in a
# non-interactive shell) starts with SIGINT ignored, and bash cannot trap a signal that was
# ignored when it started, so Ctrl-C would leave the backends running. Start again, as the same
# process, with SIGINT back to its default, so that the trap below can catch it.
if [[ $(trap -p INT) == "trap -- '' SIGINT" && -z ${BACKENDS_SIGINT_RESTORED:-} ]]; then
    export BACKENDS_SIGINT_RESTORED=1
    if env --default-signal=INT true 2>/dev/null; then
        exec env --default-signal=INT "$BASH" "${BASH_SOURCE[0]}" "$@"
    elif command -v perl >/dev/null; then
        exec perl -e '$SIG{INT} = "DEFAULT"; exec @ARGV or die "cannot run $ARGV[0]: $!\n"' \
            "$BASH" "${BASH_SOURCE[0]}" "$@"
    fi
    echo "note: SIGINT is ignored here; stop the backends with kill (SIGTERM)" >&2
fi

ports=("$@")
if ((${#ports[@]} == 0)); then
    ports=(8001 8002 8003)
fi

backend="${BACKEND_BIN:-}"
if [[ -n $backend && $backend != /* ]]; then
    backend="$PWD/$backend"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z $backend ]]; then
    cargo build --quiet --release --bin backend
    backend="${CARGO_TARGET_DIR:-target}/release/backend"
fi

pids=()
stop_all() {
    trap - INT TERM EXIT
    if ((${#pids[@]})); then
        echo "stopping backends (pids ${pids[*]})"
        kill "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap stop_all EXIT

for port in "${ports[@]}"; do
    "$backend" --listen "127.0.0.1:$port" --name "backend-$port" &
    pids+=("$!")
    echo "started backend-$port on 127.0.0.1:$port (pid $!)"
done
echo "press Ctrl-C to stop them"

# A backend that exits (killed to watch the balancer take it out, or its port was in use) is
# reported and the others go on: the script ends when none is left, or on Ctrl-C.
running=("${pids[@]}")
while ((${#running[@]})); do
    status=0
    wait -n -p exited "${running[@]}" || status=$?
    [[ -n ${exited:-} ]] || continue
    echo "backend pid $exited exited (status $status); the others go on"
    left=()
    for pid in "${running[@]}"; do
        [[ $pid == "$exited" ]] || left+=("$pid")
    done
    running=("${left[@]}")
    unset exited
done
