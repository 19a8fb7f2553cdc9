"""The baseline: a minimal aiohttp WebSocket relay that forwards each frame to the peer it names, and nothing else.

    python -m bench.relay [--port 0] [--redis-url redis://127.0.0.1:PORT/0]

A client connects to `/ws?id=NAME`; every binary frame it sends is a msgpack map whose `to` names the peer, and
the relay writes the frame unchanged to that peer's socket (an in-process dict lookup). With `--redis-url` it also
does one Redis GET (of `relay:<to>`) for every frame whose `type` is `invite`: one GET per call, for scale. It
uses the same WebSocket settings as SIP-lite (heartbeat 25 s, 64 KiB frames, no compression) and, like
`signaling serve`, logs its port as a JSON line (`relay.listening`) on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

import msgpack
from aiohttp import WSMsgType, web

PEERS = web.AppKey("peers", dict)
REDIS = web.AppKey("redis", object)
KEY_PREFIX = "relay:"


async def ws_handler(request: web.Request) -> web.StreamResponse:
    name = request.query.get("id", "")
    peers: dict[str, web.WebSocketResponse] = request.app[PEERS]
    redis: Any = request.app[REDIS]
    ws = web.WebSocketResponse(heartbeat=25.0, max_msg_size=65536, compress=False)
    await ws.prepare(request)
    peers[name] = ws
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.BINARY:
                continue
            frame = msgpack.unpackb(msg.data)
            if not isinstance(frame, dict):
                continue
            to = frame.get("to")
            if redis is not None and frame.get("type") == "invite":
                await redis.get(KEY_PREFIX + str(to))
            peer = peers.get(to) if isinstance(to, str) else None
            if peer is not None and not peer.closed:
                await peer.send_bytes(msg.data)
    finally:
        if peers.get(name) is ws:
            del peers[name]
    return ws


def _log(event: str, **fields: Any) -> None:
    sys.stderr.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stderr.flush()


async def run(host: str, port: int, redis_url: str | None) -> None:
    app = web.Application()
    app[PEERS] = {}
    redis: Any = None
    if redis_url:
        import redis.asyncio

        # redis-py's pool allows 100 connections by default and then raises; the relay must never fail a call.
        redis = redis.asyncio.Redis.from_url(redis_url, max_connections=100_000)
        await redis.ping()
    app[REDIS] = redis
    app.router.add_get("/ws", ws_handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        server: Any = site._server
        ports = sorted({s.getsockname()[1] for s in getattr(server, "sockets", None) or ()})
        _log("relay.listening", host=host, port=ports[0] if ports else port, redis=bool(redis_url))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for ws in list(app[PEERS].values()):
            await ws.close()
        await runner.cleanup()
        if redis is not None:
            await redis.aclose()
    _log("relay.stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--redis-url")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host != "localhost":
        parser.error("the relay listens on loopback only")
    if args.uvloop:
        from bench.common import install_uvloop

        install_uvloop()
    asyncio.run(run(args.host, args.port, args.redis_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
