"""N concurrent python-socketio (sync) clients: polling -> websocket upgrade -> 5 calls -> disconnect."""
import sys, threading, time, traceback, collections, logging
import socketio, requests, os
CA = os.environ.get('SOCKETIO_CA', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cert.pem'))

url = sys.argv[1]
n = int(sys.argv[2])
round_no = sys.argv[3] if len(sys.argv) > 3 else '0'
results = [None] * n
info = [''] * n
logged = collections.Counter()
class Count(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if 'WebSocket connection was closed, aborting' in msg: return
        logged[msg[:80]] += 1
        print(f'LOG round={round_no} {record.name} {record.levelname}: {msg[:300]}', flush=True)
infolog = []
class Keep(logging.Handler):
    def emit(self, record):
        infolog.append(f'{time.strftime("%H:%M:%S")}.{int(record.msecs):03d} {threading.current_thread().name} {record.name} {record.levelname}: {record.getMessage()[:200]}')
for name in ('engineio.client', 'socketio.client', 'websocket'):
    lg = logging.getLogger(name); lg.setLevel(logging.DEBUG if os.environ.get('CLIENT_MODE') == 'procs' else logging.WARNING)
    c = Count(); c.setLevel(logging.WARNING); lg.addHandler(c); lg.addHandler(Keep()); lg.propagate = False
ssl_verify = False

if os.environ.get('SSL_DIAG'):
    import ssl
    def _read(self, len=1024, buffer=None):
        self._checkClosed()
        if self._sslobj is None:
            raise ValueError("Read on closed or unwrapped SSL socket.")
        try:
            r = self._sslobj.read(len, buffer) if buffer is not None else self._sslobj.read(len)
            if not r:
                infolog.append(f'{time.strftime("%H:%M:%S")} {threading.current_thread().name} SSLDIAG read returned {r!r} (clean close_notify?) fd={self.fileno()}')
            return r
        except ssl.SSLError as x:
            infolog.append(f'{time.strftime("%H:%M:%S")} {threading.current_thread().name} SSLDIAG read raised {x!r} fd={self.fileno()}')
            if x.args[0] == ssl.SSL_ERROR_EOF and self.suppress_ragged_eofs:
                return 0 if buffer is not None else b''
            raise
    ssl.SSLSocket.read = _read

def one(i):
    t0 = time.time()
    http = requests.Session(); http.verify = CA
    sio = socketio.Client(http_session=http, reconnection=False, request_timeout=10)
    stage = 'connect'
    try:
        sio.connect(url, transports=['polling', 'websocket'], wait_timeout=10)
        stage = 'transport'
        try:
            info[i] = f"sid={sio.eio.sid} wsport={sio.eio.ws.sock.getsockname()[1]}"
        except Exception as e:
            info[i] = f"sid={getattr(sio.eio, 'sid', '?')} wsport=? ({e!r})"
        tr = sio.transport()
        if tr != 'websocket':
            time.sleep(0.5)
            tr = sio.transport()
        for k in range(5):
            stage = f'call{k}'
            r = sio.call('echo', {'i': i, 'k': k}, timeout=10)
            if r['echo'] != {'i': i, 'k': k}:
                raise RuntimeError(f'bad echo {r!r}')
        stage = 'disconnect'
        sio.disconnect()
        results[i] = ('ok', tr, time.time() - t0, '')
    except socketio.exceptions.TimeoutError as e:
        results[i] = (f'ack-timeout@{stage}', sio.transport() if sio.eio else '?', time.time() - t0, repr(e))
    except socketio.exceptions.ConnectionError as e:
        results[i] = (f'connect-error', '?', time.time() - t0, repr(e))
    except Exception as e:
        results[i] = (f'error@{stage}:{type(e).__name__}', '?', time.time() - t0, repr(e))
    finally:
        try:
            sio.disconnect()
        except Exception:
            pass

def one_in_process(i):
    one(i)
    if results[i][0] != 'ok':
        info[i] += '\n    ' + '\n    '.join(infolog[-25:])
    return results[i], dict(logged), info[i]

if os.environ.get('CLIENT_MODE') == 'procs':
    # Each client in its own process (own descriptor table), same libraries and threads inside.
    import multiprocessing
    with multiprocessing.get_context('fork').Pool(n) as pool:
        for i, (res, lg, inf) in enumerate(pool.map(one_in_process, range(n), chunksize=1)):
            results[i] = res
            info[i] = inf
            logged.update(lg)
else:
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads: t.start()
    for t in threads: t.join()
kinds = collections.Counter(r[0] for r in results)
for i, r in enumerate(results):
    if r[0] != 'ok':
        print(f'FAIL round={round_no} client={i} kind={r[0]} transport={r[1]} t={r[2]:.1f}s at={time.strftime("%H:%M:%S")} {info[i]} {r[3][:300]}', flush=True)
notws = sum(1 for r in results if r[0] == 'ok' and r[1] != 'websocket')
print(f'ROUND {round_no}: ' + ' '.join(f'{k}={v}' for k, v in sorted(kinds.items())) + f' ok-but-not-websocket={notws}', flush=True)
sys.exit(0 if not logged and kinds.get('ok', 0) == n else 1)
