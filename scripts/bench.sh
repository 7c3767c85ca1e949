#!/usr/bin/env bash
# Throughput benchmark: our balancer vs nginx vs HAProxy, all balancing round robin
# over the same three nginx backends on 127.0.0.1. See --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/bench.sh [BINARY] [OPTIONS] [-- EXTRA_BALANCER_FLAGS...]

Benchmarks a load balancer of this project against nginx and HAProxy, all three
configured as round-robin balancers over the same three nginx backends. Everything
runs on 127.0.0.1, on free high ports, from configs in a temporary directory; every
process started is stopped on exit or Ctrl-C.

BINARY            balancer binary under test (default: phase1_rr); a name is looked up
                  in target/release/ after `cargo build --release --bins`; a path
                  (containing '/') is used as is.
-- FLAGS...       extra flags for the balancer, appended after the standard ones:
                    BINARY --listen 127.0.0.1:P --backend 127.0.0.1:B1 --backend ...
                           --admin 127.0.0.1:0 FLAGS...
                  (every other flag at its default: statistics on a free port, health
                  checks as the binary has them)

Options:
  --rounds N      rounds per cell; servers alternate within a round (default 3)
  --duration SEC  seconds per wrk run (default 5)
  --warmup SEC    wrk warm-up per server before measuring (default 1; 0 = none)
  --idle N        instead of the wrk cells: open N idle keep-alive connections to
                  each server at once (one GET each, then idle) and report the time
                  until all N were answered and the server's RSS with them open
  --fd-limit N    instead of the wrk cells: start a second instance of the balancer
                  under test with its open-files limit set to N (soft and hard, as
                  `ulimit -n N`), run wrk with --clients keep-alive connections
                  against it, and report socket errors, non-2xx answers and the
                  lines it logged (targets for N=1024, 600 clients: 0, 0, < 20)
  --clients C     connections for --fd-limit (default 600)
  --watch-stats SEC
                  while measuring, fetch the balancer's /stats page every SEC seconds
                  (as a browser tab left open on it does), to measure what watching
                  costs; the admin address is read from the balancer's start-up log
  --no-build      do not run cargo build
  --self-test     use a second nginx as the "balancer under test" (checks the script
                  itself; its ratios to nginx should come out near 1.0)
  --tls           the same cells over HTTPS: each server terminates TLS with one
                  self-signed ECDSA P-256 certificate (made with openssl) and offers
                  TLS 1.2 and 1.3, the balancer with --listen off --tls-listen; the
                  version each one negotiates is printed first; the 'close' cell is
                  then new TLS handshakes per second. Two more cells, 32 keep-alive and
                  'close', with wrk held to TLS 1.2 (OPENSSL_CONF, MaxProtocol). Then
                  new connections from a client with Nagle's algorithm on, each held
                  open (scripts/bench/first_answer.py: Python's ssl, 20 connections
                  a round, the later ones resumed): the median time to the first
                  answer, TLS 1.3 and 1.2. Targets: 32 conns >= 0.8x nginx, close
                  (handshakes/s) >= 1.0x nginx, both in TLS 1.3 and 1.2; first answer
                  <= nginx's + 1 ms
  --cold          instead of the usual cells: before each run, stop the server and start
                  it again, then 256 clients connect at once for 2 s with no warm-up (the
                  readiness check connects once). Target: p99 <= nginx's
  --explain-limit only the 32 and 256 keep-alive cells, then why the balancer's req/s
                  differ from nginx's: the ratio split (in log terms) into CPU time per
                  request (the balancer's own, and the rest of the machine's: wrk, the
                  kernel's network work) and time the CPUs sat idle, with the balancer's
                  context switches per request beside it; then each one's own CPU
                  per request split into its switches, priced at what one sleep and
                  wake-up costs on this machine with that many threads (measured
                  first by scripts/bench/switch_cost.rs, built with rustc), and
                  everything else
  -h, --help      this help

Cells (wrk --latency, 2 threads): 1, 32 and 256 keep-alive connections, and 32
connections sending 'Connection: close'. For each cell and server: median req/s,
p50 and p99 over the rounds, CPU time and context switches per request, errors
(wrk socket errors and non-2xx/3xx responses), and the ratio to nginx (median over
rounds of the paired per-round ratio). Targets for the balancer: 1 conn >= 1.1x
nginx, 32 >= 0.75x, 256 >= 0.9x with p99 <= nginx's, close >= 1.0x nginx and
>= 1.0x HAProxy; idle: 1000 clients answered within 0.5 s and RSS <= 24 MiB.

Environment:
  BENCH_BALANCER_CMD  full command line of the balancer under test, overriding
                      BINARY; @LISTEN@ becomes 127.0.0.1:PORT and @BACKENDS@ the
                      "--backend 127.0.0.1:B1 --backend ..." flags, @PORT@ the
                      bare port, e.g.
                      BENCH_BALANCER_CMD='target/release/loadbalancer --listen @LISTEN@ @BACKENDS@ --admin off'
  BENCH_LABEL         name shown for the balancer under test in the tables
  BENCH_NGINX_TLS_PROTOCOLS
                      with --tls, nginx's ssl_protocols (default 'TLSv1.2 TLSv1.3', what
                      the balancer and HAProxy offer; 'TLSv1 TLSv1.1 TLSv1.2' is nginx's
                      own default before 1.23.4)

Examples:
  scripts/bench.sh                                   # phase1_rr, 3 rounds x 5 s
  scripts/bench.sh loadbalancer -- --algorithm least-conn
  scripts/bench.sh --rounds 1 --duration 2 --self-test
  scripts/bench.sh loadbalancer --tls
  scripts/bench.sh loadbalancer --idle 1000
  scripts/bench.sh loadbalancer --cold
  scripts/bench.sh phase1_rr --fd-limit 1024 --clients 600
EOF
}

# ---------------------------------------------------------------- arguments
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
HELPERS=$SCRIPT_DIR/bench
SCRIPT_NAME=bench.sh
# shellcheck source=scripts/lib/processes.sh
source "$SCRIPT_DIR/lib/processes.sh"

BINARY=phase1_rr
EXTRA_FLAGS=()
ROUNDS=3
DURATION=5
WARMUP=1
IDLE=0
FD_LIMIT=0
FD_CLIENTS=600
BUILD=1
SELF_TEST=0
WATCH_STATS=0
TLS=0
COLD=0
EXPLAIN_LIMIT=0

need_number() { [[ $2 =~ ^[0-9]+$ ]] || die "$1 needs a whole number, got '$2'"; }

while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --rounds)   need_number "$1" "${2-}"; ROUNDS=$2; shift 2 ;;
    --duration) need_number "$1" "${2-}"; DURATION=$2; shift 2 ;;
    --warmup)   need_number "$1" "${2-}"; WARMUP=$2; shift 2 ;;
    --idle)     need_number "$1" "${2-}"; IDLE=$2; shift 2 ;;
    --fd-limit) need_number "$1" "${2-}"; FD_LIMIT=$2; shift 2 ;;
    --clients)  need_number "$1" "${2-}"; FD_CLIENTS=$2; shift 2 ;;
    --watch-stats) need_number "$1" "${2-}"; WATCH_STATS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --self-test) SELF_TEST=1; shift ;;
    --tls) TLS=1; shift ;;
    --cold) COLD=1; shift ;;
    --explain-limit) EXPLAIN_LIMIT=1; shift ;;
    --) shift; EXTRA_FLAGS=("$@"); break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) BINARY=$1; shift ;;
  esac
done
((ROUNDS >= 1)) || die "--rounds must be at least 1"
((DURATION >= 1)) || die "--duration must be at least 1"
((WATCH_STATS == 0 || ! SELF_TEST)) || die "--watch-stats needs a balancer of this project, not --self-test"

# ---------------------------------------------------------------- tools
# nginx and haproxy live in /usr/sbin, which is not always on PATH.
export PATH=$PATH:/usr/sbin:/sbin

install_missing() {
  local missing=() tool
  for tool in wrk nginx haproxy; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  ((${#missing[@]})) || return 0
  echo "Installing ${missing[*]} with apt-get..."
  local sudo=()
  ((EUID == 0)) || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
}
install_missing
command -v python3 >/dev/null || die "python3 is required (stdlib only)"

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/lb-bench.XXXXXX")
PIDS=()      # every long-running process we started
CHILD=""     # the wrk or idle client running right now

# The pid and all its descendants (nginx masters have worker children).
descendants() {
  local pid=$1 p stat
  echo "$pid"
  for p in /proc/[0-9]*; do
    stat=$(cat "$p/stat" 2>/dev/null) || continue
    stat=${stat##*) }                  # drop "pid (comm) ", comm may hold spaces
    read -r _ ppid _ <<<"$stat"
    [[ $ppid == "$pid" ]] && descendants "${p#/proc/}"
  done
  return 0
}

stop_tree() {
  local pid=$1 tree i
  tree=$(descendants "$pid")
  kill -TERM $tree 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do           # up to 5 s for a graceful stop
    alive "$pid" || break
    sleep 0.1
  done
  kill -KILL $tree 2>/dev/null || true     # leftovers (e.g. orphaned workers)
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  trap - EXIT INT TERM
  set +e
  [[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null
  local pid
  for pid in "${PIDS[@]}"; do stop_tree "$pid"; done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'echo; echo "bench.sh: interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers
# utime+stime (clock ticks) summed over the process tree.
cpu_ticks() {
  local total=0 pid stat f
  for pid in $(descendants "$1"); do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    stat=${stat##*) }
    read -r -a f <<<"$stat"
    total=$((total + f[11] + f[12]))       # fields 14 and 15 of /proc/PID/stat
  done
  echo "$total"
}

# Context switches (voluntary and involuntary) of every thread alive in the process tree.
# Threads that ended are not counted: the balancer keeps its client threads for 30 s, and
# nginx and HAProxy keep theirs, so a run's difference counts (nearly) all its switches.
ctx_switches() {
  local pid
  for pid in $(descendants "$1"); do
    cat /proc/"$pid"/task/*/status 2>/dev/null || true
  done | awk '/^(non)?voluntary_ctxt_switches:/ { n += $2 } END { print n + 0 }'
}

# The whole machine's CPU ticks from /proc/stat: "busy total" (busy = all but idle and iowait).
machine_ticks() {
  awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t; exit }' /proc/stat
}

# A /proc/PID/status field (VmHWM, VmRSS; KiB) summed over the process tree.
mem_kb() {
  local total=0 pid kb
  for pid in $(descendants "$1"); do
    kb=$(awk -v k="$2:" '$1 == k { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
    total=$((total + ${kb:-0}))
  done
  echo "$total"
}

# ---------------------------------------------------------------- ports and limits
# Idle mode holds N client sockets plus N backend sockets per server.
FD_NEED=$(( IDLE * 2 + FD_CLIENTS * 2 + 4096 ))
if (( $(ulimit -Sn) < FD_NEED )); then
  ulimit -n "$FD_NEED" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi
WORKER_CONNECTIONS=$(( IDLE * 2 + 1024 > 4096 ? IDLE * 2 + 1024 : 4096 ))

read -r B1 B2 B3 LB_PORT NGINX_PORT HAPROXY_PORT LIMITED_PORT <<<"$(free_ports 7)"
BACKENDS=("127.0.0.1:$B1" "127.0.0.1:$B2" "127.0.0.1:$B3")

# ---------------------------------------------------------------- servers
# nginx in the foreground with its own prefix dir (pid file, temp dirs, logs).
start_nginx() {
  local name=$1 conf=$2 port=$3 dir=$TMP/$1
  mkdir -p "$dir/logs"
  printf '%s\n' "$conf" >"$dir/nginx.conf"
  nginx -p "$dir/" -c "$dir/nginx.conf" -e "$dir/logs/error.log" >"$dir/out.log" 2>&1 &
  PIDS+=($!)
  wait_port "$name" "$!" "$port" "$dir/logs/error.log"
}

nginx_common() {  # shared top of every nginx config
  cat <<EOF
daemon off;
master_process on;
worker_processes $1;
worker_rlimit_nofile $(( WORKER_CONNECTIONS * 2 ));
pid nginx.pid;
error_log logs/error.log warn;
events { worker_connections $WORKER_CONNECTIONS; }
EOF
}

http_common() {   # shared http{} settings
  cat <<'EOF'
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path tmp/body;
  proxy_temp_path tmp/proxy;
  fastcgi_temp_path tmp/fastcgi;
  uwsgi_temp_path tmp/uwsgi;
  scgi_temp_path tmp/scgi;
EOF
}

start_backends() {
  local servers="" i port
  for i in 1 2 3; do
    port=${BACKENDS[i-1]#*:}
    servers+="
  server {
    listen 127.0.0.1:$port;
    default_type text/plain;
    location = /health { return 200 \"ok\n\"; }
    location / { return 200 \"hello from backend $i\n\"; }
  }"
  done
  mkdir -p "$TMP/backends/tmp"
  start_nginx backends "$(nginx_common 1)
http {
$(http_common)
$servers
}" "$B3"
  wait_port backends "${PIDS[-1]}" "$B1" /dev/null
  wait_port backends "${PIDS[-1]}" "$B2" /dev/null
}

# nginx as a round-robin balancer (the reference, and the --self-test stand-in).
nginx_lb_conf() {
  local port=$1 b upstream=""
  for b in "${BACKENDS[@]}"; do upstream+="    server $b;
"; done
  cat <<EOF
$(nginx_common 2)
http {
$(http_common)
  upstream backends {
$upstream    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$port$( ((TLS)) && printf ' ssl;\n    ssl_certificate %s;\n    ssl_certificate_key %s;\n    ssl_protocols %s' "$TMP/tls/cert.pem" "$TMP/tls/key.pem" "$NGINX_TLS_PROTOCOLS");
    location / {
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
}

start_nginx_lb() {  # name port
  mkdir -p "$TMP/$1/tmp"
  start_nginx "$1" "$(nginx_lb_conf "$2")" "$2"
}

start_haproxy() {
  local dir=$TMP/haproxy maxconn=$(( WORKER_CONNECTIONS ))
  mkdir -p "$dir"
  cat >"$dir/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn $maxconn

defaults
  mode http
  maxconn $maxconn
  option http-keep-alive
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  timeout http-request 30s
  timeout http-keep-alive 30s

frontend fe
  bind 127.0.0.1:$HAPROXY_PORT$( ((TLS)) && printf ' ssl crt %s alpn http/1.1' "$TMP/tls/haproxy.pem")
  default_backend be

backend be
  balance roundrobin
  http-reuse always
  server b1 ${BACKENDS[0]}
  server b2 ${BACKENDS[1]}
  server b3 ${BACKENDS[2]}
EOF
  haproxy -db -f "$dir/haproxy.cfg" >"$dir/out.log" 2>&1 &
  PIDS+=($!)
  wait_port haproxy "$!" "$HAPROXY_PORT" "$dir/out.log"
}

# The balancer under test: --self-test, BENCH_BALANCER_CMD, or a cargo binary.
LB_LABEL=${BENCH_LABEL:-}
start_balancer() {
  local log=$TMP/balancer.log backend_flags=() b cmd
  for b in "${BACKENDS[@]}"; do backend_flags+=(--backend "$b"); done
  if ((SELF_TEST)); then
    LB_LABEL=${LB_LABEL:-nginx-as-lb}
    echo "balancer under test: a second nginx (--self-test)"
    start_nginx_lb selftest "$LB_PORT"
    return
  elif [[ -n ${BENCH_BALANCER_CMD:-} ]]; then
    cmd=${BENCH_BALANCER_CMD//@LISTEN@/127.0.0.1:$LB_PORT}
    cmd=${cmd//@PORT@/$LB_PORT}
    cmd=${cmd//@BACKENDS@/${backend_flags[*]}}
    LB_LABEL=${LB_LABEL:-$(basename "${cmd%% *}")}
    (cd "$REPO_ROOT" && exec bash -c "exec $cmd") >"$log" 2>&1 &
  else
    local bin=$BINARY
    if [[ $bin != */* ]]; then
      if ((BUILD)); then
        echo "Building release binaries (cargo build --release --bins)..." >&2
        (cd "$REPO_ROOT" && cargo build --release --bins >&2)
      fi
      bin=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/$BINARY
    fi
    [[ -x $bin ]] || die "balancer binary '$bin' not found or not executable"
    LB_LABEL=${LB_LABEL:-$(basename "$bin")}
    local listen=(--listen "127.0.0.1:$LB_PORT")
    if ((TLS)); then
      listen=(--listen off --tls-listen "127.0.0.1:$LB_PORT"
        --tls-cert "$TMP/tls/cert.pem" --tls-key "$TMP/tls/key.pem")
    fi
    cmd="$bin ${listen[*]} ${backend_flags[*]} --admin 127.0.0.1:0"
    "$bin" "${listen[@]}" "${backend_flags[@]}" \
      --admin 127.0.0.1:0 "${EXTRA_FLAGS[@]}" >"$log" 2>&1 &
    cmd+=" ${EXTRA_FLAGS[*]}"
  fi
  PIDS+=($!)
  echo "balancer under test: $cmd"
  wait_port "$LB_LABEL" "$!" "$LB_PORT" "$log"
}

# --tls: one certificate for every server, ECDSA P-256 as most sites use today.
SCHEME=http
if ((TLS)); then
  ((IDLE == 0 && FD_LIMIT == 0 && COLD == 0)) || die "--tls goes with the wrk cells, not --idle, --fd-limit or --cold"
  [[ -z ${BENCH_BALANCER_CMD:-} ]] || die "--tls and BENCH_BALANCER_CMD: add the TLS flags to the command and leave out --tls"
  command -v openssl >/dev/null || die "--tls needs openssl to make the certificate"
  mkdir -p "$TMP/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$TMP/tls/key.pem" -out "$TMP/tls/cert.pem" 2>/dev/null || die "openssl could not make a certificate"
  cat "$TMP/tls/cert.pem" "$TMP/tls/key.pem" >"$TMP/tls/haproxy.pem"
  # wrk's OpenSSL reads this for the TLS 1.2 cells: it offers nothing newer than TLS 1.2.
  cat >"$TMP/tls/tls12.cnf" <<'CNF'
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_configuration
[ssl_configuration]
system_default = tls_system_default
[tls_system_default]
MaxProtocol = TLSv1.2
CNF
  SCHEME=https CACERT=$TMP/tls/cert.pem
fi
# The TLS versions nginx offers: TLS 1.2 and 1.3, as the balancer and HAProxy do and as nginx does
# by default since 1.23.4 (before, its default left 1.3 out, and a wrk client then resumed its
# sessions over TLS 1.2, with no key exchange at all: another protocol, not the same cell).
NGINX_TLS_PROTOCOLS=${BENCH_NGINX_TLS_PROTOCOLS:-TLSv1.2 TLSv1.3}

echo "Starting backends and balancers on 127.0.0.1 (temp dir $TMP)..."
start_backends
# Each start_* runs in this shell (a subshell could not append to PIDS);
# the pid of what it started is the last one in PIDS.
start_balancer; LB_PID=${PIDS[-1]}
start_nginx_lb nginx "$NGINX_PORT"; NGINX_PID=${PIDS[-1]}
start_haproxy; HAPROXY_PID=${PIDS[-1]}
LB_LABEL=${LB_LABEL:-balancer}

# --watch-stats: a browser tab on /stats, reloading itself every WATCH_STATS seconds.
if ((WATCH_STATS > 0)); then
  ADMIN=$(sed -n 's|.*statistics on http://\([^/]*\)/stats.*|\1|p' "$TMP/balancer.log" | head -n1)
  [[ -n $ADMIN ]] || die "--watch-stats: the balancer logged no statistics address (--admin off?)"
  python3 - "$ADMIN" "$WATCH_STATS" "$TMP/watch.txt" <<'PY' &
import sys, time, urllib.request
admin, every, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
fetched = size = 0
while True:
    try:
        with urllib.request.urlopen(f"http://{admin}/stats", timeout=10) as page:
            size = len(page.read())
    except OSError:
        sys.exit(0)  # the balancer is gone: the run is over
    fetched += 1
    with open(out, "w") as f:
        f.write(f"{fetched} {size}\n")
    time.sleep(every)
PY
  PIDS+=($!)
  echo "watching http://$ADMIN/stats every ${WATCH_STATS}s during the run"
fi

declare -A PORT=([lb]=$LB_PORT [nginx]=$NGINX_PORT [haproxy]=$HAPROXY_PORT)
declare -A PID=([lb]=$LB_PID [nginx]=$NGINX_PID [haproxy]=$HAPROXY_PID)
declare -A NAME=([lb]=$LB_LABEL [nginx]=nginx [haproxy]=haproxy)
SERVERS=(lb nginx haproxy)
for s in "${SERVERS[@]}"; do check_http "${NAME[$s]}" "${PORT[$s]}"; done

echo "backends ${BACKENDS[*]}; ${NAME[lb]} :$LB_PORT, nginx :$NGINX_PORT, haproxy :$HAPROXY_PORT"
echo "machine: $(nproc) CPUs, $(nginx -v 2>&1 | sed 's/.*: //'), $(haproxy -v | head -n1 | cut -d' ' -f1-3), $(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-2)"
if ((TLS)); then
  # What an OpenSSL client (wrk's library) gets from each server: the cells compare like with like
  # only when these agree.
  for s in "${SERVERS[@]}"; do
    echo "  ${NAME[$s]}: $(openssl s_client -connect "127.0.0.1:${PORT[$s]}" -servername localhost \
      </dev/null 2>/dev/null | grep -m1 -E '^(New|Reused),' || echo 'no TLS session')"
  done
fi
echo

# Run a foreground job in the background and wait for it, so that Ctrl-C and
# TERM reach our traps right away instead of after the job finishes.
run_child() {
  local rc=0
  "$@" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}

# ---------------------------------------------------------------- --idle mode
if ((IDLE > 0)); then
  echo "Idle test: $IDLE keep-alive connections to each server, all at once"
  for s in "${SERVERS[@]}"; do
    run_child python3 "$HELPERS/idle.py" --port "${PORT[$s]}" --pid "${PID[$s]}" \
      --n "$IDLE" --label "$s" >>"$TMP/idle.tsv"
  done
  echo
  python3 "$HELPERS/report.py" idle "$TMP/idle.tsv" "$LB_LABEL"
  exit 0
fi

# ---------------------------------------------------------------- --fd-limit mode
# The balancer under test again, on a port of its own, started by the same command under
# `ulimit -n FD_LIMIT`; its log is counted from start-up to the end of the wrk run.
if ((FD_LIMIT > 0)); then
  ((SELF_TEST == 0)) || die "--fd-limit measures the balancer under test, not --self-test"
  log=$TMP/limited.log
  limited_cmd=$(tr '\0' ' ' <"/proc/$LB_PID/cmdline")
  limited_cmd=${limited_cmd//127.0.0.1:$LB_PORT/127.0.0.1:$LIMITED_PORT}
  (ulimit -n "$FD_LIMIT" && cd "$REPO_ROOT" && exec bash -c "exec $limited_cmd") >"$log" 2>&1 &
  PIDS+=($!)
  wait_port "${NAME[lb]} (limited)" "$!" "$LIMITED_PORT" "$log"
  echo "Open-files limit: ${NAME[lb]} under ulimit -n $FD_LIMIT, $FD_CLIENTS keep-alive clients for ${DURATION}s"
  out=$TMP/wrk-limited.txt
  run_child wrk -t 2 -c "$FD_CLIENTS" -d "${DURATION}s" --timeout 5s \
    "http://127.0.0.1:$LIMITED_PORT/" >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed"; }
  requests=$(awk '/requests in/ { print $1 }' "$out")
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
  socket=$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$out")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
  lines=$(wc -l <"$log")
  printf '  %s requests (%s req/s), socket errors %s, non-2xx %s, log lines %s\n' \
    "$requests" "$rps" "${socket:-0}" "${non2xx:-0}" "$lines"
  sed 's/^/  | /' "$log"
  verdict=PASS
  ((${socket:-0} == 0 && ${non2xx:-0} == 0 && lines < 20)) || verdict=FAIL
  echo "  target (0 socket errors, 0 non-2xx, < 20 log lines): $verdict"
  exit 0
fi

# ---------------------------------------------------------------- wrk cells
# wrk time suffixes (us, ms, s, m) -> milliseconds
to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : 1
    printf "%.4f", n * f }'
}

# One wrk run: server cell round conns [extra wrk args] -> one line in runs.tsv
run_wrk() {
  local server=$1 cell=$2 round=$3 conns=$4; shift 4
  local out=$TMP/wrk-$cell-$server-$round.txt threads=$(( conns < 2 ? conns : 2 ))
  local t0 t1 s0 s1 m0 m1
  t0=$(cpu_ticks "${PID[$server]}")
  s0=$(ctx_switches "${PID[$server]}")
  read -r -a m0 <<<"$(machine_ticks)"
  # The TLS 1.2 cells (c32_12, close32_12): wrk's OpenSSL offers TLS 1.2 at most.
  local openssl_conf=${OPENSSL_CONF-}
  [[ $cell == *_12 ]] && openssl_conf=$TMP/tls/tls12.cnf
  OPENSSL_CONF=$openssl_conf run_child wrk -t "$threads" -c "$conns" -d "${DURATION}s" --latency "$@" \
    "$SCHEME://127.0.0.1:${PORT[$server]}/" >"$out" 2>&1 || {
    echo "bench.sh: wrk failed against ${NAME[$server]}:" >&2; cat "$out" >&2; exit 1; }
  read -r -a m1 <<<"$(machine_ticks)"     # first: the others take a while to read
  t1=$(cpu_ticks "${PID[$server]}")
  s1=$(ctx_switches "${PID[$server]}")

  local rps p50 p99 requests socket non2xx errors detail
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
  p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
  p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
  requests=$(awk '/requests in/ { print $1 }' "$out")
  # "Socket errors: connect 0, read 0, write 0, timeout 0" (only printed if any)
  socket=$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$out")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
  errors=$(( ${socket:-0} + ${non2xx:-0} ))
  detail=$(grep -E 'Socket errors|Non-2xx' "$out" | sed 's/^ *//' | paste -sd ';' - || true)
  [[ -n $rps && -n $requests ]] || { echo "bench.sh: cannot parse wrk output:" >&2; cat "$out" >&2; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$cell" "$server" "$round" \
    "$rps" "$p50" "$p99" "$errors" "$requests" "$((t1 - t0))" "$((s1 - s0))" \
    "$((m1[0] - m0[0]))" "$((m1[1] - m0[1]))" "$detail" >>"$TMP/runs.tsv"
  printf '  %-8s round %d  %-14s %10.0f req/s  p99 %8.3f ms%s\n' "$cell" "$round" \
    "${NAME[$server]}" "$rps" "$p99" "$( ((errors)) && echo "  ERRORS: $detail")"
}

CELL_IDS=(c1 c32 c256 close32)
declare -A CELL_CONNS=([c1]=1 [c32]=32 [c256]=256 [close32]=32 [cold256]=256 [c32_12]=32 [close32_12]=32)
MODE=http
((TLS)) && MODE=tls CELL_IDS+=(c32_12 close32_12)
# --cold: 256 clients at once on servers started just before, for COLD_SECONDS, no warm-up.
COLD_SECONDS=2
if ((COLD)); then
  MODE=cold CELL_IDS=(cold256) DURATION=$COLD_SECONDS WARMUP=0 BUILD=0
elif ((EXPLAIN_LIMIT)); then
  MODE=limit CELL_IDS=(c32 c256)
fi

# Stops a server and starts it again on the same port, fresh: no thread, process or backend
# connection left from earlier runs. The readiness check only connects once.
restart_server() {
  stop_tree "${PID[$1]}"
  case $1 in
    lb) start_balancer >/dev/null ;;
    nginx) start_nginx_lb nginx "$NGINX_PORT" ;;
    haproxy) start_haproxy ;;
  esac
  PID[$1]=${PIDS[-1]}
}

# --explain-limit prices the context switches: what one sleep and wake-up costs on this machine
# with 2, 32 and 256 threads taking turns on one CPU, measured while the servers are idle by a
# small program built with plain rustc (scripts/bench/switch_cost.rs).
SWITCH_US=
if ((EXPLAIN_LIMIT)); then
  if rustc -O --edition 2021 -o "$TMP/switch_cost" "$HELPERS/switch_cost.rs" 2>"$TMP/rustc.log" &&
    "$TMP/switch_cost" 2 32 256 >"$TMP/switch_cost.txt" 2>>"$TMP/rustc.log"; then
    read -r two t32 t256 across <"$TMP/switch_cost.txt"
    SWITCH_US="2=$two,32=$t32,256=$t256"
    echo "One sleep and wake-up (threads passing a byte over socket pairs): $two us between 2"
    echo "threads on one CPU, $t32 us among 32, $t256 us among 256; $across us when the woken one"
    echo "is on another, idle CPU"
  else
    echo "bench.sh: cannot build or run $HELPERS/switch_cost.rs, switches left unpriced:" >&2
    cat "$TMP/rustc.log" >&2
  fi
fi

if ((WARMUP > 0)); then
  echo "Warm-up: ${WARMUP}s of 32 connections per server"
  for s in "${SERVERS[@]}"; do
    run_child wrk -t 2 -c 32 -d "${WARMUP}s" "$SCHEME://127.0.0.1:${PORT[$s]}/" >/dev/null
  done
fi

echo "Measuring$( ((TLS)) && echo ' over HTTPS'): ${#CELL_IDS[@]} cells x $ROUNDS rounds x 3 servers x ${DURATION}s"
: >"$TMP/runs.tsv"
for cell in "${CELL_IDS[@]}"; do
  extra=()
  [[ $cell == close32* ]] && extra=(-H "Connection: close")
  for ((round = 1; round <= ROUNDS; round++)); do
    for s in "${SERVERS[@]}"; do
      [[ $cell == cold256 ]] && restart_server "$s"
      run_wrk "$s" "$cell" "$round" "${CELL_CONNS[$cell]}" "${extra[@]}"
    done
  done
done

for s in "${SERVERS[@]}"; do
  printf '%s\t%s\n' "$s" "$(mem_kb "${PID[$s]}" VmHWM)"
done >"$TMP/mem.tsv"

# --tls: new connections from a client with Nagle's algorithm on, each held open; one line per
# server, version and round in first.tsv.
FIRST_COUNT=20
if ((TLS)); then
  echo "First answers: $FIRST_COUNT new connections a round from Python's ssl, Nagle on, held open"
  : >"$TMP/first.tsv"
  for version in 1.3 1.2; do
    for ((round = 1; round <= ROUNDS; round++)); do
      for s in "${SERVERS[@]}"; do
        run_child python3 "$HELPERS/first_answer.py" 127.0.0.1 "${PORT[$s]}" "$CACERT" \
          "$version" "$FIRST_COUNT" >"$TMP/first.json" ||
          die "first_answer.py failed against ${NAME[$s]} (TLS $version)"
        printf '%s\t%s\t%s\t%s\n' "$version" "$s" "$round" "$(cat "$TMP/first.json")" >>"$TMP/first.tsv"
      done
    done
  done
fi

echo
python3 "$HELPERS/report.py" wrk "$TMP/runs.tsv" "$TMP/mem.tsv" "$LB_LABEL" "$(getconf CLK_TCK)" "$MODE" "$SWITCH_US"
((TLS)) && python3 "$HELPERS/report.py" first "$TMP/first.tsv" "$LB_LABEL"
if ((WATCH_STATS > 0)) && [[ -s $TMP/watch.txt ]]; then
  read -r fetched size <"$TMP/watch.txt"
  echo "/stats fetched $fetched times ($size bytes each) while measuring"
fi
