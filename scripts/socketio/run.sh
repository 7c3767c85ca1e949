#!/bin/bash
# Issue 34's Socket.IO run: three python-socketio servers (aiohttp) behind the balancer with
# --sticky, over HTTPS (or plain HTTP), and ROUNDS rounds of CLIENTS python-socketio clients, each
# connecting with long-polling, upgrading to WebSocket and making five calls that wait for their
# acknowledgement. Exits 0 when every client of every round succeeded.
#
# usage: scripts/socketio/run.sh BINARY ROUNDS [tls|plain] [CLIENTS]
#   CLIENT_SCRIPT=client.py        the threaded socketio.Client instead of the default
#                                  socketio.AsyncClient (client_async.py): its engineio races on
#                                  its own TLS socket, and fails now and then with HAProxy or no
#                                  proxy in front as well (see docs/testing.md)
#   SOCKETIO_VENV=DIR              where the Python packages go (default: a folder in $TMPDIR)
# Needs python3 with venv and pip (PyPI), openssl and curl; everything runs on 127.0.0.1.
set -u
BIN=$(readlink -f "$1"); ROUNDS=$2; MODE=${3:-tls}; N=${4:-40}
D=$(cd "$(dirname "$0")" && pwd)
VENV=${SOCKETIO_VENV:-${TMPDIR:-/tmp}/lb-socketio-venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q python-socketio aiohttp requests websocket-client ||
    { echo "run.sh: cannot install the Python packages into $VENV" >&2; exit 2; }
fi
PY=$VENV/bin/python
OUT=$(mktemp -d "${TMPDIR:-/tmp}/lb-socketio.XXXXXX")
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null ||
  { echo "run.sh: openssl could not make a certificate" >&2; exit 2; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT INT TERM
freeport() { "$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
BACKS=()
for i in 1 2 3; do
  p=$(freeport); "$PY" "$D/server.py" "$p" >"$OUT/server$i.log" 2>&1 & PIDS+=($!); BACKS+=(--backend 127.0.0.1:$p)
done
LP=$(freeport); AP=$(freeport)
if [ "$MODE" = tls ]; then
  LISTEN=(--listen off --tls-listen 127.0.0.1:$LP --tls-cert "$OUT/cert.pem" --tls-key "$OUT/key.pem"); URL=https://127.0.0.1:$LP
else
  LISTEN=(--listen 127.0.0.1:$LP); URL=http://127.0.0.1:$LP
fi
for i in $(seq 100); do
  ok=1; for b in "${BACKS[@]}"; do [ "$b" = --backend ] && continue; curl -sf "http://$b/health" >/dev/null || ok=0; done
  [ $ok = 1 ] && break; sleep 0.2
done
"$BIN" "${LISTEN[@]}" "${BACKS[@]}" --sticky --admin 127.0.0.1:$AP --stats-interval 0 -v >"$OUT/lb.log" 2>&1 & PIDS+=($!)
for i in $(seq 50); do curl -skf "$URL/health" >/dev/null && break; sleep 0.2; done
echo "out=$OUT url=$URL"
FAILS=0
for r in $(seq "$ROUNDS"); do
  SOCKETIO_CA="$OUT/cert.pem" env -u REQUESTS_CA_BUNDLE -u CURL_CA_BUNDLE ${CLIENT_STRACE:+strace -f -tt -qq -s 6 -x -e trace=socket,connect,close,write,shutdown -o $OUT/strace.$r} "$PY" "$D/${CLIENT_SCRIPT:-client_async.py}" "$URL" "$N" "$r" >>"$OUT/clients.log" 2>&1 || FAILS=$((FAILS+1))
  grep "^ROUND $r:" "$OUT/clients.log" | tail -1
done
echo "== total ($ROUNDS rounds x $N clients, $MODE, $(basename "$BIN")):"
grep -h "^FAIL" "$OUT/clients.log" | sed 's/.* kind=\([^ ]*\).*/\1/' | sort | uniq -c
echo "client-side warnings:"; grep -h "^LOG" "$OUT/clients.log" | cut -c1-160 | sed 's/round=[0-9]* //' | sort | uniq -c | head
echo "lb log: $(grep -c 'TLS handshake failed' "$OUT/lb.log") 'TLS handshake failed' lines"; grep -h "TLS handshake failed\|WARN\|ERROR" "$OUT/lb.log" | head -5
echo "rounds with failures: $FAILS"
[ "$FAILS" = 0 ]
