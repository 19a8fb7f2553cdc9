"""The `signaling` command: `serve` runs the server, `token` signs a registration token for local trials, and
`demo` runs the iOS VoIP push wake-up story end to end on loopback (no Redis, no Apple credentials needed)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

from aiohttp import web

from push.base import PushConfigError
from signaling import config, log
from signaling.auth import issue_token
from signaling.clock import SystemClock
from signaling.errors import StoreUnavailable

logger = log.get_logger("signaling")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: config.Settings) -> int:
    from signaling.server import create_app

    log.configure(settings.log_level, settings.log_format)
    if settings.uses_dev_secret:
        if not _is_loopback(settings.host):
            raise config.ConfigError(
                "no JWT key configured: set SIPLITE_JWT_SECRET or SIPLITE_JWT_PUBLIC_KEY_FILE before "
                f"listening on {settings.host}"
            )
        logger.warning(
            "auth.dev_secret",
            detail="no JWT key configured: using the built-in development secret (loopback only); "
            "`signaling token USER` signs tokens for it",
        )
    if settings.redis_url is None:
        logger.warning(
            "store.embedded",
            detail="no SIPLITE_REDIS_URL: using the in-memory store; this process cannot share state "
            "with other processes",
        )
    loop_factory = None
    if settings.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_run(create_app(settings), settings))
    return 0


async def _run(app: web.Application, settings: config.Settings) -> None:
    """Serve until SIGTERM or SIGINT, then drain (clients sent elsewhere with 1012, owned calls given up to
    `drain_timeout` to end), close what is left with 1001 and clean up."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=settings.shutdown_timeout)
    # Before anything is announced: a SIGTERM that follows `server.listening` at once must drain, not kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await runner.setup()  # starts the store: an unreachable Redis raises StoreUnavailable here
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        ports = sorted({sock.getsockname()[1] for sock in getattr(site._server, "sockets", None) or ()})
        logger.info(
            "server.listening",
            host=settings.host,
            port=ports[0] if ports else settings.port,
            event_loop=type(loop).__module__.partition(".")[0],
        )
        await stop.wait()
        logger.info("server.stopping", node_id=settings.node_id)
        from signaling.server import SWITCHBOARD

        await app[SWITCHBOARD].drain(settings.drain_timeout)
    finally:
        await runner.cleanup()
    logger.info("server.stopped", node_id=settings.node_id)


def token(settings: config.Settings, user: str, name: str | None, ttl: float) -> int:
    if settings.jwt_public_key_file is not None:
        raise config.ConfigError(
            "tokens for a public key are signed by the app backend with its private key, not by this command"
        )
    print(issue_token(user, key=settings.jwt_key(), now=SystemClock().now(), ttl=ttl, name=name))
    return 0


def _seconds(minimum_exclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (minimum_exclusive and value == 0):
            raise argparse.ArgumentTypeError(f"must be {'greater than' if minimum_exclusive else 'at least'} 0")
        return value

    return parse


_DEMO_DESCRIPTION = """\
Run the push wake-up story in one process, on loopback only: a local APNs-compatible server (HTTP/2 over TLS,
with a fresh CA and signing key in a temporary directory), a SIP-lite server with the in-memory store and the real
APNs provider pointed at it, a caller "alice" and a callee "bob" whose phone registered a VoIP push token and went
to sleep. Alice calls bob; the server pushes the phone through the local APNs; the phone wakes, connects,
registers, gets the held INVITE, rings and answers; alice ACKs and hangs up. A timeline of every stage (ms since
the INVITE) and the latency of each step are printed. Needs no Redis, no Apple credentials, no configuration
(--config and SIPLITE_* settings are ignored). Exits 0 on success, 1 if a stage fails or times out."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="signaling", description=__doc__)
    parser.add_argument("--config", help="TOML configuration file (environment variables override it)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run the signaling server")
    serve_p.add_argument("--host", help="address to listen on (SIPLITE_HOST)")
    serve_p.add_argument("--port", type=int, help="port to listen on (SIPLITE_PORT)")
    token_p = sub.add_parser(
        "token", help="print a registration token for USER, signed with the configured secret"
    )
    token_p.add_argument("user")
    token_p.add_argument("--name", help="display name shown to callees")
    token_p.add_argument("--ttl", type=float, default=3600.0, help="seconds until the token expires")
    demo_p = sub.add_parser(
        "demo",
        help="run the VoIP push wake-up story end to end on loopback and print its timeline",
        description=_DEMO_DESCRIPTION,
    )
    demo_p.add_argument(
        "--wake-delay",
        type=_seconds(False),
        default=0.2,
        metavar="SECONDS",
        help="time the woken app takes to start before it connects (default: 0.2)",
    )
    demo_p.add_argument(
        "--talk",
        type=_seconds(False),
        default=0.5,
        metavar="SECONDS",
        help="time between the caller's ACK and its BYE (default: 0.5)",
    )
    demo_p.add_argument(
        "--timeout",
        type=_seconds(True),
        default=10.0,
        metavar="SECONDS",
        help="bound on every wait; a stage that takes longer fails the demo (default: 10)",
    )
    demo_p.add_argument("--json", action="store_true", help="print the timeline as one JSON document")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from signaling import demo

        return demo.main(wake_delay=args.wake_delay, talk=args.talk, timeout=args.timeout, as_json=args.json)
    try:
        settings = config.load(config_file=args.config)
        if args.command == "serve":
            overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
            if overrides:
                settings = replace(settings, **overrides).validate()
            return serve(settings)
        return token(settings, args.user, args.name, args.ttl)
    except config.ConfigError as exc:
        print(f"signaling: configuration error: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"signaling: {exc}", file=sys.stderr)
        return 3
    except PushConfigError as exc:
        from signaling.server import APNS_SETTINGS

        name = APNS_SETTINGS.get(exc.setting or "", f"apns_{exc.setting}")
        setting = f"SIPLITE_{name.upper()}: " if exc.setting else ""
        print(f"signaling: push configuration error: {setting}{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"signaling: cannot start: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
