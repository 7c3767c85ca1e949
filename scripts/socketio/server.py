import sys
import socketio
from aiohttp import web

port = int(sys.argv[1])
sio = socketio.AsyncServer(async_mode='aiohttp', cors_allowed_origins='*')
app = web.Application()
sio.attach(app)

async def health(request):
    return web.Response(text='ok')
app.router.add_get('/health', health)

@sio.event
async def echo(sid, data):
    return {'echo': data, 'port': port}

@sio.event
async def connect(sid, environ, auth=None):
    pass

ssl_ctx = None
if len(sys.argv) > 3:
    import ssl
    ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ssl_ctx.load_cert_chain(sys.argv[2], sys.argv[3])
web.run_app(app, host='127.0.0.1', port=port, print=None, access_log=None, ssl_context=ssl_ctx)
