#!/usr/bin/env bash
# Starts three demo backends on 127.0.0.1:8001-8003 (named backend-8001..backend-8003) and stops them
# all on Ctrl-C, SIGTERM or exit. Works from any directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --quiet --release --bin backend
target_dir="${CARGO_TARGET_DIR:-target}"
backend="$target_dir/release/backend"

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

for port in 8001 8002 8003; do
    "$backend" --listen "127.0.0.1:$port" --name "backend-$port" &
    pids+=("$!")
    echo "started backend-$port on 127.0.0.1:$port (pid $!)"
done
echo "press Ctrl-C to stop them"

# Returns as soon as any backend exits (e.g. its port was in use); the EXIT trap stops the others.
wait -n "${pids[@]}" || true
