"""N concurrent python-socketio AsyncClients (asyncio + aiohttp, one thread): polling -> websocket -> 5 calls."""
import sys, asyncio, time, collections, logging
import socketio

url, n = sys.argv[1], int(sys.argv[2])
round_no = sys.argv[3] if len(sys.argv) > 3 else '0'
logged = collections.Counter()
class Count(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if 'WebSocket connection was closed, aborting' in msg or 'Server sent close packet' in msg: return
        logged[msg[:80]] += 1
        print(f'LOG round={round_no} {record.name} {record.levelname}: {msg[:300]}', flush=True)
for name in ('engineio.client', 'socketio.client'):
    lg = logging.getLogger(name); lg.setLevel(logging.WARNING); lg.addHandler(Count()); lg.propagate = False

async def one(i):
    t0 = time.time()
    import aiohttp
    http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # keep the sticky cookie for 127.0.0.1
    sio = socketio.AsyncClient(http_session=http, ssl_verify=False, reconnection=False, request_timeout=10)
    stage = 'connect'
    try:
        await sio.connect(url, transports=['polling', 'websocket'], wait_timeout=10)
        stage = 'transport'
        tr = sio.transport()
        for k in range(5):
            stage = f'call{k}'
            r = await sio.call('echo', {'i': i, 'k': k}, timeout=10)
            if r['echo'] != {'i': i, 'k': k}:
                raise RuntimeError(f'bad echo {r!r}')
        stage = 'disconnect'
        await sio.disconnect()
        return ('ok', tr, time.time() - t0, '')
    except socketio.exceptions.TimeoutError as e:
        res = (f'ack-timeout@{stage}', sio.transport(), time.time() - t0, repr(e))
    except socketio.exceptions.ConnectionError as e:
        res = ('connect-error', '?', time.time() - t0, repr(e))
    except Exception as e:
        res = (f'error@{stage}:{type(e).__name__}', '?', time.time() - t0, repr(e))
    try:
        await sio.disconnect()
    except Exception:
        pass
    return res

async def one_closing(i):
    try:
        return await one(i)
    finally:
        pass

async def main():
    return await asyncio.gather(*(one(i) for i in range(n)))

results = asyncio.run(main())
kinds = collections.Counter(r[0] for r in results)
for i, r in enumerate(results):
    if r[0] != 'ok':
        print(f'FAIL round={round_no} client={i} kind={r[0]} transport={r[1]} t={r[2]:.1f}s at={time.strftime("%H:%M:%S")} {r[3][:300]}', flush=True)
notws = sum(1 for r in results if r[0] == 'ok' and r[1] != 'websocket')
print(f'ROUND {round_no}: ' + ' '.join(f'{k}={v}' for k, v in sorted(kinds.items())) + f' ok-but-not-websocket={notws}', flush=True)
sys.exit(0 if not logged and kinds.get('ok', 0) == n else 1)
