# shellcheck shell=bash
# Helpers shared by scripts/bench.sh and scripts/soak.sh, sourced by both: processes, free
# ports, readiness, usage errors. Messages start with $SCRIPT_NAME (set by the sourcing script).

# A usage error: the message, then exit code 2.
die() { echo "$SCRIPT_NAME: $*" >&2; exit 2; }

# Alive and not a zombie waiting to be reaped.
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# N free ports on 127.0.0.1, held open together so they are distinct.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Wait until PORT accepts connections (bounded), failing early if PID died; a process that
# exited with 2 (a bad flag) makes this a usage error too.
wait_port() {
  local name=$1 pid=$2 port=$3 log=$4 i
  for ((i = 0; i < 200; i++)); do          # up to 10 s
    if ! alive "$pid"; then
      local rc=0
      wait "$pid" || rc=$?
      echo "$SCRIPT_NAME: $name exited during start-up (exit code $rc); its log:" >&2
      tail -n 20 "$log" >&2
      ((rc == 2)) && exit 2
      exit 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "$SCRIPT_NAME: $name did not accept on 127.0.0.1:$port within 10 s; its log:" >&2
  tail -n 20 "$log" >&2
  exit 1
}

# One GET through PORT; fails unless the status line says 200. With SCHEME=https the GET goes
# over TLS, trusting the certificate in $CACERT.
check_http() {
  local name=$1 port=$2 line
  if [[ ${SCHEME:-http} == https ]]; then
    line=$(curl -sS --max-time 5 --cacert "$CACERT" -o /dev/null -w '%{http_code}' \
      "https://localhost:$port/" --resolve "localhost:$port:127.0.0.1" 2>&1) || true
    [[ $line == 200 ]] || { echo "$SCRIPT_NAME: $name answered '$line' over HTTPS" >&2; exit 1; }
    return
  fi
  exec 3<>"/dev/tcp/127.0.0.1/$port"
  printf 'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
  IFS= read -r -t 5 line <&3 || line="(no answer)"
  exec 3<&-
  [[ $line == "HTTP/1."[01]" 200"* ]] || { echo "$SCRIPT_NAME: $name answered '$line'" >&2; exit 1; }
}
