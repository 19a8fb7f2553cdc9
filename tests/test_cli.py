"""`signaling serve` and `signaling token` as real processes, and the configuration they read."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from signaling import config
from signaling.client import Client
from tests.redis_server import free_port

STARTUP_TIMEOUT = 20.0


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIPLITE_")}
    return {**base, "SIPLITE_LOG_FORMAT": "json", "SIPLITE_PORT": "0", **extra}


async def run_cli(*args: str, environ: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "signaling",
        *args,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), STARTUP_TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@asynccontextmanager
async def serving(
    environ: dict[str, str],
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, list[dict[str, object]]]]:
    """Start `signaling serve`, wait for its `server.listening` log line, yield (process, base URL, log)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signaling", "serve", env=environ, stderr=PIPE
    )
    assert proc.stderr is not None
    lines: list[dict[str, object]] = []
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while True:
                raw = await proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"server exited early: {lines}")
                line = json.loads(raw)
                lines.append(line)
                if line["event"] == "server.listening":
                    break
        yield proc, f"http://127.0.0.1:{line['port']}", lines
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_serve_with_defaults_token_and_sigterm(event_loop: str) -> None:
    environ = env() if event_loop == "asyncio" else env(SIPLITE_EVENT_LOOP=event_loop)  # asyncio: the default
    code, token, _ = await run_cli("token", "alice", "--name", "Alice", environ=environ)
    assert code == 0
    async with serving(environ) as (proc, base, log):
        events = [line["event"] for line in log]
        assert "auth.dev_secret" in events
        assert "store.embedded" in events
        assert [line["event_loop"] for line in log if line["event"] == "server.listening"] == [event_loop]
        async with aiohttp.ClientSession() as session, session.get(base + "/healthz") as resp:
            assert resp.status == 200
        client = await Client.connect(base + "/ws")
        assert (await client.register(token.strip(), "alice-phone"))["user"] == "alice"
        proc.send_signal(signal.SIGTERM)
        # Drained: told to connect elsewhere, then closed with 1012 (service restart).
        assert (await client.next_event("reconnect", timeout=STARTUP_TIMEOUT))["reason"] == "draining"
        assert (await client.wait_closed(timeout=STARTUP_TIMEOUT)).code == 1012
        await client.close()
        assert await asyncio.wait_for(proc.wait(), STARTUP_TIMEOUT) == 0


@pytest.mark.parametrize("url_fixture", ["redis_url", "redis_cluster_url", "redis_sentinel_url"])
async def test_serve_with_redis(request: pytest.FixtureRequest, url_fixture: str) -> None:
    """One server, a Redis Cluster, a master found through Sentinel: each is reached by its URL alone."""
    environ = env(SIPLITE_REDIS_URL=request.getfixturevalue(url_fixture), SIPLITE_JWT_SECRET="s" * 32)
    async with serving(environ) as (proc, base, log):
        assert "store.embedded" not in [line["event"] for line in log]
        async with aiohttp.ClientSession() as session, session.get(base + "/readyz") as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), STARTUP_TIMEOUT) == 0


@pytest.mark.parametrize(
    ("template", "where"),
    [
        ("redis://:hunter2-secret@127.0.0.1:{port}/0", "at 127.0.0.1:{port}"),
        ("redis+cluster://:hunter2-secret@127.0.0.1:{port},127.0.0.1:{port}", "at cluster 127.0.0.1:{port}"),
        (
            "redis+sentinel://:hunter2-secret@127.0.0.1:{port}/main",
            "at master 'main' of Sentinel 127.0.0.1:{port}",
        ),
    ],
)
async def test_unreachable_redis_fails_fast_with_a_clear_message(template: str, where: str) -> None:
    port = free_port()
    code, _, err = await run_cli("serve", environ=env(SIPLITE_REDIS_URL=template.format(port=port)))
    assert code == 3
    assert f"cannot reach Redis {where.format(port=port)}" in err
    assert "hunter2" not in err
    assert "<redis." not in err  # no client reprs


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"SIPLITE_PORT": "eighty"}, "SIPLITE_PORT"),
        ({"SIPLITE_RING_TIMEOUT": "0"}, "SIPLITE_RING_TIMEOUT"),
        ({"SIPLITE_JWT_SECRET": "short"}, "SIPLITE_JWT_SECRET"),
        ({"SIPLITE_HOST": "0.0.0.0"}, "no JWT key configured"),  # noqa: S104 - refusing it is the point
        ({"SIPLITE_REDIS_URL": "http://x"}, "SIPLITE_REDIS_URL"),
        ({"SIPLITE_EVENT_LOOP": "trio"}, "SIPLITE_EVENT_LOOP must be uvloop or asyncio"),
        ({"SIPLITE_JWT_ALGORITHMS": "none"}, "SIPLITE_JWT_ALGORITHMS: 'none' (unsigned tokens) is never accepted"),
        ({"SIPLITE_JWT_ALGORITHMS": "HS256,None"}, "SIPLITE_JWT_ALGORITHMS: 'none'"),
        ({"SIPLITE_JWT_ALGORITHMS": "HS257"}, "SIPLITE_JWT_ALGORITHMS: unknown algorithm 'HS257'"),
        ({"SIPLITE_JWT_ALGORITHMS": "ES256"}, "SIPLITE_JWT_ALGORITHMS: ES256 needs SIPLITE_JWT_PUBLIC_KEY_FILE"),
        (
            {"SIPLITE_JWT_PUBLIC_KEY_FILE": "/k.pem", "SIPLITE_JWT_ALGORITHMS": "RS256,HS256"},
            "SIPLITE_JWT_ALGORITHMS: HS256 needs a shared secret",
        ),
        ({"SIPLITE_REDIS_URL": "redis+sentinel://127.0.0.1:26379"}, "SIPLITE_REDIS_URL: a Sentinel URL names"),
        (
            {"SIPLITE_APNS_KEY_FILE": "/nonexistent/AuthKey.p8"},
            "SIPLITE_APNS_KEY_FILE: APNs key_file: cannot read",
        ),
        (
            {"SIPLITE_APNS_CERT_FILE": "/nonexistent/c.pem", "SIPLITE_APNS_KEEPALIVE": "-1"},
            "SIPLITE_APNS_KEEPALIVE",
        ),
    ],
)
async def test_bad_configuration_exits_2_naming_the_setting(extra: dict[str, str], message: str) -> None:
    code, _, err = await run_cli("serve", environ=env(**extra))
    assert code == 2
    assert message in err


def test_toml_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "siplite.toml"
    path.write_text('port = 9000\nring_timeout = 30\njwt_public_key_file = "/k.pem"\njwt_algorithms = ["ES256"]\n')
    settings = config.load({"SIPLITE_PORT": "9100"}, str(path))
    assert (settings.port, settings.ring_timeout, settings.jwt_algorithms) == (9100, 30.0, ("ES256",))
    path.write_text("prot = 1\n")
    with pytest.raises(config.ConfigError, match="unknown setting 'prot'"):
        config.load({}, str(path))


def test_the_sample_configuration_loads() -> None:
    sample = Path(__file__).parent.parent / "deploy" / "siplite.toml"
    settings = config.load({}, str(sample))
    assert settings.redis_url is not None
    assert settings.jwt_audience == "sip-lite"
