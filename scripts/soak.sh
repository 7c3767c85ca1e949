#!/usr/bin/env bash
# Soak test with chaos: mixed load on a balancer for N minutes while its backends
# are killed, hung and cut off, then a verdict on errors, leaks and the log. See --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/soak.sh [BINARY] [--minutes N] [--quick] [OPTIONS] [-- EXTRA_BALANCER_FLAGS...]

Runs a load balancer of this project in front of four demo backends for N minutes
(default 10) under mixed load, with chaos, and prints a table of samples and a
verdict. Everything runs on 127.0.0.1 on free high ports, from a temporary
directory; every process started is stopped on exit, error or Ctrl-C.

BINARY            balancer under test (default: loadbalancer); a name is looked up in
                  target/release/ after `cargo build --release --bins`; a path
                  (containing '/') is used as is, with the `backend` binary found
                  beside it (or given by SOAK_BACKEND).
-- FLAGS...       extra balancer flags, after the standard ones:
                    BINARY --listen 127.0.0.1:P --backend 127.0.0.1:B1 ... --backend ...:B4
                           --admin 127.0.0.1:A [--sticky --max-sessions 1000] FLAGS...
                  `loadbalancer` gets --sticky (so sticky clients have sessions to keep)
                  and, with phase4_sticky, --max-sessions 1000 (so the session table
                  is full within seconds and its memory belongs to the baseline),
                  unless FLAGS set them.

Options:
  --minutes N     minutes of load (default 10)
  --quick         about 20 s of load instead, with the chaos scaled down (a kill at
                  4 s, a 5 s stop at 6 s, samples every 2 s, the reference sample at
                  14 s); the wait for threads to end afterwards still takes up to 45 s
  --no-build      do not run cargo build
  --keep          keep the temporary directory (logs, samples, results); it is always
                  kept when the verdict is FAIL
  -h, --help      this help

Backends (demo `backend`, each answering after 10 ms, like a small application, so
that requests are in flight when chaos strikes):
  b1-killed     SIGKILLed every 20 s (first at 20 s) and restarted on the same port
  b2-stopped    SIGSTOPped for 10 s every minute (at 45 s of each minute): a hung backend
  b3-resetting  --reset-percent 5: every 20th response cut off midway (head and half
                the body, then a reset)
  b4-steady     never touched
Load (scripts/soak/load.py, one thread per client, 48 clients): 12 keep-alive GET,
8 `Connection: close` GET, 8 sticky GET keeping cookies, 4 uploading 1 MiB with POST
every second, 4 slow readers downloading /bytes/1048576 at about 320 KB/s, 4 plain
WebSockets; and over HTTPS (the balancer's --tls-listen, a P-256 certificate made
with openssl), a mix like Socket.IO's: 8 long-polling clients (keep-alive GETs and
small POSTs keeping cookies, Nagle's algorithm on) and 8 WebSockets sending small
frames in bursts of three before reading the three echoes.

Samples every 10 s (2 s with --quick): the balancer's RSS, threads, descriptors
(those of client connections, of backend connections, the rest), its /stats.json requests,
errors and retries, and the clients' requests and errors by kind.

Verdict (exit code 0 PASS, 1 FAIL, 2 usage error):
  1. errors only where the rules allow them: a POST in flight on the killed backend
     (never resent: 502 or a reset), a response cut short by the resetting backend
     or by the kill after its head was relayed, a 504 when the hung backend outlasts
     --backend-timeout; each kind counted and explained, every other error fails
     (a WebSocket message whose echo never came back among them)
  2. flat under load: the last sample under load at most 5 % above the sample at
     half-time in RSS (glibc's per-thread caches of freed blocks fill over the first
     minutes; a leak grows as fast in the second half), and within 5 % (or 2) of the
     reference sample after the first minute (30 s with --minutes 1, 14 s with
     --quick) in threads and in descriptors other than those of client and backend
     connections (which follow the requests in flight and the chaos; rule 3 checks
     they are back to the baseline)
  3. back to the baseline once the load stops (polled for up to 45 s, as client
     threads wait 30 s for a next connection before they end): threads, client
     connections and descriptors other than pooled backend connections; and the heap
     in use (/stats.json), the threads' caches given back, at most 1 MiB above the
     baseline's and the spare read buffers (a leak of 8 bytes a request is about
     1.6 MiB in 10 minutes)
  4. no WARN or ERROR line in the balancer's log but backend state changes,
     "unreachable" backends, retries and rate-limited "suppressed" summaries
  5. every kind of client was served, and the balancer exits 0 on SIGTERM

Examples:
  scripts/soak.sh                          # loadbalancer, 10 minutes
  scripts/soak.sh --quick                  # about a minute in all
  scripts/soak.sh phase3_passive_health --minutes 3
  scripts/soak.sh loadbalancer -- --algorithm least-conn
EOF
}

# ---------------------------------------------------------------- arguments
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
HELPERS=$SCRIPT_DIR/soak
SCRIPT_NAME=soak.sh
# shellcheck source=scripts/lib/processes.sh
source "$SCRIPT_DIR/lib/processes.sh"

BINARY=loadbalancer
EXTRA_FLAGS=()
MINUTES=10
QUICK=0
BUILD=1
KEEP=0


while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --minutes)
      [[ ${2-} =~ ^[0-9]+$ ]] || die "--minutes needs a whole number, got '${2-}'"
      MINUTES=$((10#$2)); shift 2 ;;
    --quick) QUICK=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    --) shift; EXTRA_FLAGS=("$@"); break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) BINARY=$1; shift ;;
  esac
done
((MINUTES >= 1)) || die "--minutes must be at least 1"
((MINUTES <= 24 * 60)) || die "--minutes must be at most a day"
command -v python3 >/dev/null || die "python3 is required (standard library only)"
command -v openssl >/dev/null || die "openssl is required (it makes the HTTPS certificate)"
[[ -r /proc/self/status ]] || die "/proc is required (Linux)"

# Every duration below is in whole seconds from the start of the load.
if ((QUICK)); then
  DURATION=20 SAMPLE_EVERY=2 KILL_FIRST=4 KILL_EVERY=20
  STOP_PERIOD=20 STOP_AT=6 STOP_FOR=5 REFERENCE_AT=14
else
  DURATION=$((MINUTES * 60)) SAMPLE_EVERY=10 KILL_FIRST=20 KILL_EVERY=20
  STOP_PERIOD=60 STOP_AT=45 STOP_FOR=10 REFERENCE_AT=60
  ((MINUTES > 1)) || REFERENCE_AT=30
fi
DRAIN_LIMIT=45
RESET_PERCENT=5
BACKEND_DELAY=10ms

# ---------------------------------------------------------------- binaries
BALANCER=$BINARY
if [[ $BALANCER != */* ]]; then
  if ((BUILD)); then
    echo "Building release binaries (cargo build --release --bins)..." >&2
    (cd "$REPO_ROOT" && cargo build --release --bins >&2)
  fi
  BALANCER=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/$BINARY
fi
BACKEND_BIN=${SOAK_BACKEND:-$(dirname "$BALANCER")/backend}
[[ -x $BALANCER ]] || die "balancer binary '$BALANCER' not found or not executable"
[[ -x $BACKEND_BIN ]] || die "backend binary '$BACKEND_BIN' not found (set SOAK_BACKEND)"

# Sessions for the sticky clients, and a bound on the table, unless the caller chose.
has_flag() {
  local flag=$1 f
  for f in "${EXTRA_FLAGS[@]}"; do [[ $f == "$flag" || $f == "$flag="* ]] && return 0; done
  return 1
}
STICKY_FLAGS=()
case $(basename "$BALANCER") in
  loadbalancer)
    has_flag --sticky || STICKY_FLAGS+=(--sticky)
    has_flag --max-sessions || STICKY_FLAGS+=(--max-sessions 1000) ;;
  phase4_sticky)
    has_flag --max-sessions || STICKY_FLAGS+=(--max-sessions 1000) ;;
esac

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lb-soak.XXXXXX")
BACKEND_PIDS=(0 0 0 0)
LB_PID=""
LOAD_PID=""
VERDICT=""

stop_process() {
  local pid=$1 i
  [[ -n $pid && $pid != 0 ]] || return 0
  kill -CONT "$pid" 2>/dev/null || true      # a stopped process cannot act on TERM
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  trap - EXIT INT TERM
  set +e
  local pid
  stop_process "$LOAD_PID"
  stop_process "$LB_PID"
  for pid in "${BACKEND_PIDS[@]}"; do stop_process "$pid"; done
  if ((KEEP)) || [[ $VERDICT != PASS ]]; then
    echo "soak.sh: logs, samples and results kept in $TMP" >&2
  else
    rm -rf "$TMP"
  fi
}
trap cleanup EXIT
trap 'echo; echo "soak.sh: interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers
# Microseconds since the epoch, and a sleep until a given one.
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }
sleep_until_us() {
  local left=$(($1 - $(now_us)))
  ((left <= 0)) || sleep "$(printf '%d.%06d' $((left / 1000000)) $((left % 1000000)))"
}

# A chaos event, for the report: epoch seconds, seconds into the load, what, which backend.
event() { printf '%s\t%s\t%s\t%s\n' "$EPOCHREALTIME" "$1" "$2" "$3" >>"$TMP/events.tsv"; }

# ---------------------------------------------------------------- processes
read -r B1 B2 B3 B4 LB_PORT ADMIN_PORT TLS_PORT <<<"$(free_ports 7)"
BACKEND_PORTS=("$B1" "$B2" "$B3" "$B4")
BACKEND_NAMES=(b1-killed b2-stopped b3-resetting b4-steady)

start_backend() {  # index 0..3
  local i=$1 flags=(--delay "$BACKEND_DELAY")
  ((i == 2)) && flags+=(--reset-percent "$RESET_PERCENT")
  "$BACKEND_BIN" --listen "127.0.0.1:${BACKEND_PORTS[i]}" --name "${BACKEND_NAMES[i]}" \
    "${flags[@]}" >>"$TMP/${BACKEND_NAMES[i]}.log" 2>&1 &
  BACKEND_PIDS[i]=$!
  wait_port "${BACKEND_NAMES[i]}" "$!" "${BACKEND_PORTS[i]}" "$TMP/${BACKEND_NAMES[i]}.log"
}

# HTTPS: one self-signed ECDSA P-256 certificate for localhost.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null || die "openssl could not make a certificate"

start_balancer() {
  local flags=(--listen "127.0.0.1:$LB_PORT" --admin "127.0.0.1:$ADMIN_PORT"
               --tls-listen "127.0.0.1:$TLS_PORT" --tls-cert "$TMP/cert.pem" --tls-key "$TMP/key.pem") p
  for p in "${BACKEND_PORTS[@]}"; do flags+=(--backend "127.0.0.1:$p"); done
  flags+=("${STICKY_FLAGS[@]}" "${EXTRA_FLAGS[@]}")
  echo "balancer under test: $BALANCER ${flags[*]}"
  "$BALANCER" "${flags[@]}" >"$TMP/balancer.log" 2>&1 &
  LB_PID=$!
  wait_port balancer "$LB_PID" "$LB_PORT" "$TMP/balancer.log"
  wait_port "balancer statistics" "$LB_PID" "$ADMIN_PORT" "$TMP/balancer.log"
}

# One sample line appended to samples.jsonl; with a baseline file, succeeds when back to it.
sample() {  # t phase [baseline file]
  local args=(--pid "$LB_PID" --lb-port "$LB_PORT" --tls-port "$TLS_PORT" --admin-port "$ADMIN_PORT"
              --backend-ports "$(IFS=,; echo "${BACKEND_PORTS[*]}")"
              --progress "$TMP/progress.json" --t "$1" --phase "$2")
  [[ -n ${3-} ]] && args+=(--baseline "$3")
  python3 "$HELPERS/sample.py" "${args[@]}" >>"$TMP/samples.jsonl"
}

echo "Starting four backends and the balancer on 127.0.0.1 (temp dir $TMP)..."
for i in 0 1 2 3; do start_backend "$i"; done
start_balancer
check_http balancer "$LB_PORT"
sleep 1                                    # let the first health checks settle
sample 0 baseline
tail -n 1 "$TMP/samples.jsonl" >"$TMP/baseline.json"

if ((QUICK)); then
  echo "Quick soak: ${DURATION} s of load; b1 killed at ${KILL_FIRST} s, b2 stopped at ${STOP_AT} s for ${STOP_FOR} s"
else
  echo "Soak: $MINUTES min of load; b1 killed every ${KILL_EVERY} s, b2 stopped ${STOP_FOR} s every minute"
fi

# ---------------------------------------------------------------- load and chaos
# The load goes on LOAD_TAIL s past the last sample, so that sample is taken under full load.
LOAD_TAIL=2
python3 "$HELPERS/load.py" --port "$LB_PORT" --tls-port "$TLS_PORT" --cafile "$TMP/cert.pem" \
  --duration "$((DURATION + LOAD_TAIL))" \
  --out "$TMP/load.json" --progress "$TMP/progress.json" 2>"$TMP/load.log" &
LOAD_PID=$!
START_US=$(now_us)
event 0 start load

STOPPED_UNTIL=-1
for ((t = 1; t <= DURATION; t++)); do
  sleep_until_us $((START_US + t * 1000000))
  alive "$LB_PID" || { echo "soak.sh: the balancer died at ${t} s; its log:" >&2; tail -n 20 "$TMP/balancer.log" >&2; exit 1; }
  if ((t % SAMPLE_EVERY == 0)); then
    sample "$t" load || true
    printf '\r  %d/%d s' "$t" "$DURATION" >&2
  fi
  ((t < DURATION)) || break
  if ((t == STOPPED_UNTIL)); then
    kill -CONT "${BACKEND_PIDS[1]}"
    event "$t" cont "${BACKEND_NAMES[1]}"
  fi
  if ((t >= KILL_FIRST && (t - KILL_FIRST) % KILL_EVERY == 0)); then
    kill -KILL "${BACKEND_PIDS[0]}"
    event "$t" kill "${BACKEND_NAMES[0]}"
    wait "${BACKEND_PIDS[0]}" 2>/dev/null || true
    start_backend 0
    event "$t" restarted "${BACKEND_NAMES[0]}"
  fi
  if ((t % STOP_PERIOD == STOP_AT && t + STOP_FOR < DURATION)); then
    kill -STOP "${BACKEND_PIDS[1]}"
    event "$t" stop "${BACKEND_NAMES[1]}"
    STOPPED_UNTIL=$((t + STOP_FOR))
  fi
done
echo >&2
kill -CONT "${BACKEND_PIDS[1]}" 2>/dev/null || true
event "$DURATION" end load

echo "Load over; waiting for the clients' last requests..."
wait "$LOAD_PID" || echo "soak.sh: the load generator failed; see $TMP/load.log" >&2
LOAD_PID=""
[[ -s $TMP/load.json ]] || { echo "soak.sh: no results from the load generator:" >&2; tail -n 20 "$TMP/load.log" >&2; exit 1; }

# ---------------------------------------------------------------- drain
echo "Waiting up to ${DRAIN_LIMIT} s for threads and descriptors to come back to the baseline..."
DRAIN_START_US=$(now_us)
for ((i = 1; i <= DRAIN_LIMIT; i++)); do
  sleep_until_us $((DRAIN_START_US + i * 1000000))
  sample "$((($(now_us) - START_US) / 1000000))" drain "$TMP/baseline.json" && break
done

# ---------------------------------------------------------------- stop and report
kill -TERM "$LB_PID"
EXIT_CODE=timeout
for ((i = 0; i < 150; i++)); do            # the balancer drains for up to 10 s
  alive "$LB_PID" || break
  sleep 0.1
done
if ! alive "$LB_PID"; then
  EXIT_CODE=0
  wait "$LB_PID" || EXIT_CODE=$?
  LB_PID=""
fi

REPORT_ARGS=(--tmp "$TMP" --load-end "$((DURATION + LOAD_TAIL))" --reference-at "$REFERENCE_AT"
             --drain-limit "$DRAIN_LIMIT" --exit-code "$EXIT_CODE"
             --killed "${BACKEND_NAMES[0]}" --stopped "${BACKEND_NAMES[1]}"
             --resetting "${BACKEND_NAMES[2]}")
if python3 "$HELPERS/report.py" "${REPORT_ARGS[@]}"; then
  VERDICT=PASS
else
  VERDICT=FAIL
  exit 1
fi
