"""deploy/ checked with the tools that run it, on this machine.

- `haproxy.cfg`: `haproxy -c`, then a real HAProxy in front of three real `signaling serve` processes on one real
  Redis: a call placed through it, then the process that owns the call drained (SIGTERM) while it goes on.
- `siplite@.service`: `systemd-analyze verify`, and its stop timeout against the drain.
- `kubernetes/siplite.yaml`: validated against the Kubernetes API schemas (kubernetes-validate, offline), and
  checked for a readiness probe on /readyz, a preStop pause and a grace period longer than the drain, a Service
  and a PodDisruptionBudget.
- `docker-compose.yml`: `docker-compose config` (Debian's Compose v1, which needs no Docker engine for it), and
  its service names, ports and settings against haproxy.cfg and the Dockerfile.

A missing tool fails its test: `scripts/ensure-deploy-tools` installs them (`make test` and `.ci/run` call it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import kubernetes_validate
import pytest
import yaml

from signaling import config
from signaling.client import Client, Reconnect
from signaling.config import Settings
from tests.harness import ANSWER, OFFER, SECRET
from tests.processes import Node, device, serving
from tests.redis_server import free_port
from tests.test_cli import STARTUP_TIMEOUT

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
COMPOSE = DEPLOY / "docker-compose.yml"
UNIT = DEPLOY / "siplite@.service"
MANIFESTS = DEPLOY / "kubernetes" / "siplite.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

CANDIDATE = "candidate:1 1 udp 2122260223 192.0.2.1 50000 typ host"
SETTING_NAMES = {f"SIPLITE_{f.name.upper()}" for f in fields(Settings)} | {"SIPLITE_CONFIG"}
# The backends haproxy.cfg reads from the environment: `server s1 "${SIPLITE_1}"` ...
BACKEND_VARIABLES = re.findall(r'^\s*server \S+ "\$\{(SIPLITE_\w+)\}"', HAPROXY_CFG.read_text(), re.MULTILINE)


def tool(name: str) -> str:
    """The path of a command-line tool, failing the test (never skipping it) when it is not installed."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=search)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/ensure-deploy-tools (make test and .ci/run do)")
    return found


def run(*command: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def settings_of(environ: Mapping[str, str]) -> Settings:
    """The settings a process started with `environ` gets; every SIPLITE_ name in it must be a real setting."""
    unknown = sorted(name for name in environ if name.startswith("SIPLITE_") and name not in SETTING_NAMES)
    assert unknown == [], f"not settings: {unknown}"
    return config.load(environ)


def stop_budget(settings: Settings) -> float:
    """Seconds a process may take between SIGTERM and exiting on its own: the drain, then closing sockets."""
    return settings.drain_timeout + settings.shutdown_timeout


def dockerfile_env() -> dict[str, str]:
    """The image's `ENV NAME=value ...` settings."""
    found: dict[str, str] = {}
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ENV "):
            for item in line.split()[1:]:
                name, value = item.split("=", 1)
                found[name] = value
    return found


# ---------------------------------------------------------------------------------------------- HAProxy


def haproxy_env(backends: Sequence[str], listen: str) -> dict[str, str]:
    assert len(backends) == len(BACKEND_VARIABLES) == 3
    return {**os.environ, "SIPLITE_LISTEN": listen, **dict(zip(BACKEND_VARIABLES, backends, strict=True))}


def test_haproxy_accepts_the_configuration() -> None:
    backends = [f"127.0.0.1:{port}" for port in (8081, 8082, 8083)]
    result = run(tool("haproxy"), "-c", "-f", str(HAPROXY_CFG), env=haproxy_env(backends, "127.0.0.1:8080"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output and "ALERT" not in output, output


def tail(log: Path) -> str:
    """The end of a log file, for a failure message (a few kilobytes: reading it does not stall the loop)."""
    return log.read_text(errors="replace")[-4000:]


@asynccontextmanager
async def haproxy(backends: Sequence[str], log: Path) -> AsyncIterator[str]:
    """deploy/haproxy.cfg run in the foreground in front of `backends`; yields its base URL once it answers
    /readyz with 200 (a backend is ready behind it)."""
    port = free_port()
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            tool("haproxy"),
            "-db",
            "-f",
            str(HAPROXY_CFG),
            env=haproxy_env(backends, f"127.0.0.1:{port}"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        async with aiohttp.ClientSession() as http:
            while True:
                if proc.returncode is not None:
                    raise AssertionError(f"haproxy exited with {proc.returncode}:\n{tail(log)}")
                try:
                    async with http.get(base + "/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, f"haproxy did not answer in time:\n{tail(log)}"
                await asyncio.sleep(0.02)  # polling, bounded by the deadline
        yield base
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def holding(nodes: Sequence[Node], user: str, since: Mapping[str, int] | None = None) -> Node:
    """The process among `nodes` that logs `user`'s registration (after `since[node.name]`), waiting for it."""
    waits = {
        asyncio.ensure_future(n.logged("presence.registered", since=(since or {}).get(n.name, 0), user_id=user)): n
        for n in nodes
    }
    try:
        for first in asyncio.as_completed(waits):
            with contextlib.suppress(AssertionError):  # that one exited or timed out: another may log it
                line = await first
                return next(n for n in nodes if line in n.log)
        raise AssertionError(f"no process logged {user}'s registration")
    finally:
        for wait in waits:
            wait.cancel()


async def exit_status(n: Node) -> int:
    """`n`'s exit status once it exits; a failure quoting the end of its log if it has not within `WAIT`."""
    try:
        return await n.exited()
    except TimeoutError:
        raise AssertionError(f"{n.name} is still running; its log ends with {n.log[-12:]}") from None


async def test_a_call_through_haproxy_goes_on_while_the_process_that_owns_it_drains(
    redis_url: str, tmp_path: Path
) -> None:
    async with AsyncExitStack() as stack:
        # A 1 s node TTL: a process that is gone is noticed in about a second and a half (see the BYE below).
        nodes = await stack.enter_async_context(
            serving(redis_url, ("node-1", "node-2", "node-3"), SIPLITE_NODE_TTL="1")
        )
        base = await stack.enter_async_context(
            haproxy([f"127.0.0.1:{n.port}" for n in nodes], tmp_path / "haproxy.log")
        )
        lb = base.replace("http://", "ws://") + "/ws"

        async def phone(user: str) -> Client:
            client = await device(lb, user, reconnect=Reconnect(initial=0.0))
            stack.push_async_callback(client.close)
            return client

        # leastconn gives each its own process: alice, bob, and carol, who stays idle.
        alice, bob, _ = await phone("alice"), await phone("bob"), await phone("carol")
        owner = await holding(nodes, "alice")
        others = [n for n in nodes if n is not owner]
        assert {(await holding(nodes, user)).name for user in ("bob", "carol")} == {n.name for n in others}

        call = await alice.invite("bob", OFFER)
        await (await bob.incoming()).answer(ANSWER)
        await call.answered()
        await call.ack()
        await bob.next_event("ack")

        # The caller's process owns the call. SIGTERM drains it: alice is sent away (`reconnect`, close 1012) and
        # comes back through HAProxy, which still counts the draining process as up (its checks are seconds
        # apart) and, by leastconn, picks it: it has no connection left. It answers the upgrade 503, and HAProxy
        # retries on another process at once (retry-on 503), so alice's first attempt succeeds.
        marks = {n.name: n.mark() for n in others}
        owner.terminate()
        assert (await alice.next_event("reconnect"))["reason"] == "draining"
        reconnected = await alice.next_event("reconnected")
        assert (reconnected["attempt"], reconnected["url"]) == (1, lb)
        assert (await alice.next_event("peer", call_id=call.call_id))["state"] == "connected"
        await holding(others, "alice", marks)

        # The call, still owned by the draining process, carries frames between its parties elsewhere.
        await call.ice(CANDIDATE, mid="0", mline_index=0)
        assert (await bob.next_event("ice", call_id=call.call_id))["candidate"] == CANDIDATE
        await call.hangup()
        # With its last call over, the process exits at once, well before SIPLITE_DRAIN_TIMEOUT.
        assert await exit_status(owner) == 0
        assert [line["calls_left"] for line in owner.events("server.drained")] == [0]
        bye = await bob.next_event("bye", call_id=call.call_id)
        # The drain lets the process exit only once the call's last frames went out (its BYE to bob, on another
        # process, included): bob hears the hangup, not the process's heartbeat lapsing (peer_gone).
        assert bye["reason"] == "remote_hangup"

        # With the process gone (connections refused until the checks notice), a new client still gets in.
        await phone("dave")
        await holding(others, "dave")


# ---------------------------------------------------------------------------------------------- systemd


def unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # `systemd-analyze verify` needs no running systemd (PID 1 in a container is not), but it loads the unit as
    # the manager would: it needs the units its default dependencies name (sysinit.target ...) and checks that
    # the ExecStart binary exists. So it runs on a scratch root holding a copy of this machine's units, the
    # unit itself and an executable stand-in at the ExecStart path.
    analyze = tool("systemd-analyze")
    units = next((d for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if d.is_dir()), None)
    assert units is not None and (units / "sysinit.target").exists(), "systemd's unit files are not installed"
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    text = UNIT.read_text()
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    [exec_start] = unit_values(text, "ExecStart")
    binary = root / exec_start.split()[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)

    result = run(analyze, "verify", f"--root={root}", "siplite@8081.service")
    # Mistakes in a unit file (an unknown key, a bad value) are printed as warnings with exit status 0.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")

    assert exec_start.split()[1:] == ["serve"]
    assert unit_values(text, "KillSignal") == ["SIGTERM"]
    environment = dict(item.split("=", 1) for line in unit_values(text, "Environment") for item in line.split())
    instance = {k: v.replace("%i", "8081").replace("%H", "host") for k, v in environment.items()}
    settings = settings_of({**instance, "SIPLITE_JWT_SECRET": SECRET})
    assert settings.port == 8081
    [stop_timeout] = unit_values(text, "TimeoutStopSec")
    assert float(stop_timeout) > stop_budget(settings)


# ---------------------------------------------------------------------------------------------- Kubernetes


def manifests() -> dict[str, dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d is not None]
    by_kind = {d["kind"]: d for d in documents}
    assert len(by_kind) == len(documents), "one object of each kind"
    return by_kind


def test_the_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    objects = manifests()
    assert set(objects) == {"Deployment", "Service", "PodDisruptionBudget"}
    versions = kubernetes_validate.utils.all_versions()
    for version in (versions[0], versions[-1]):  # the oldest and newest release the package knows
        for obj in objects.values():
            kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError


def test_the_deployment_is_ready_on_readyz_and_drains_before_it_is_killed() -> None:
    objects = manifests()
    deployment, service, budget = objects["Deployment"], objects["Service"], objects["PodDisruptionBudget"]
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # Values from Secrets and the downward API stand in as what they would be in a pod.
    from_cluster = {"SIPLITE_JWT_SECRET": SECRET, "SIPLITE_REDIS_URL": "redis://redis:6379/0"}
    env = {e["name"]: e.get("value") or from_cluster.get(e["name"], "siplite-pod") for e in container["env"]}
    settings = settings_of({**dockerfile_env(), **env})
    assert container["args"] == ["--port", str(ports["ws"])]

    readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (readiness["path"], ports[readiness["port"]]) == ("/readyz", ports["ws"])
    assert (liveness["path"], ports[liveness["port"]]) == ("/healthz", ports["ws"])

    # preStop gives the endpoints time to drop the pod before SIGTERM starts the drain; the whole of it must end
    # before the grace period does, or SIGKILL cuts the calls the pod still owns.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(command[1]) + stop_budget(settings)
    assert settings.drain_timeout == 25

    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(ports["ws"], "ws")]
    assert budget["spec"]["selector"]["matchLabels"] == labels
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    useradd = re.search(r"useradd .*--uid (\d+)", DOCKERFILE.read_text())
    assert useradd is not None and pod["spec"]["securityContext"]["runAsUser"] == int(useradd[1])


# ---------------------------------------------------------------------------------------------- Docker Compose


def compose(**extra: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SIPLITE_", "COMPOSE_", "DOCKER_"))}
    return run(tool("docker-compose"), "-f", str(COMPOSE), "config", env={**base, **extra})


def test_docker_compose_accepts_the_file_and_it_agrees_with_haproxy_cfg() -> None:
    result = compose(SIPLITE_JWT_SECRET=SECRET)
    assert result.returncode == 0, result.stderr
    services: dict[str, dict[str, Any]] = yaml.safe_load(result.stdout)["services"]
    proxy = services["haproxy"]

    # HAProxy's backends are the SIP-lite services, at the port each listens on, all of one Redis.
    assert sorted(proxy["environment"]) == sorted(BACKEND_VARIABLES)  # SIPLITE_LISTEN keeps its default, :8080
    node_ids = set()
    for variable in BACKEND_VARIABLES:
        host, port = proxy["environment"][variable].rsplit(":", 1)
        assert host in proxy["depends_on"]
        settings = settings_of({**dockerfile_env(), **services[host]["environment"]})
        assert settings.port == int(port)
        assert settings.redis_url is not None and urlsplit(settings.redis_url).hostname in services
        node_ids.add(settings.node_id)
        grace = services[host]["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) > stop_budget(settings)
    assert len(node_ids) == len(BACKEND_VARIABLES)

    assert [(p["published"], p["target"]) for p in proxy["ports"]] == [(8080, 8080)]
    # The image runs the HAProxy release the tests above ran the same file with.
    version = re.search(r"version (\d+\.\d+)", run(tool("haproxy"), "-v").stdout)
    assert version is not None and proxy["image"] == f"haproxy:{version[1]}", (
        "update the image or the tests' HAProxy"
    )
    [volume] = proxy["volumes"]
    source, target = volume.split(":")[:2]
    assert (Path(source), target) == (HAPROXY_CFG, "/usr/local/etc/haproxy/haproxy.cfg")  # the image's path


def test_docker_compose_refuses_to_start_without_a_jwt_secret() -> None:
    result = compose()
    assert result.returncode != 0
    assert "set SIPLITE_JWT_SECRET" in result.stderr


def test_the_dockerfile_copies_what_the_package_build_needs() -> None:
    text = DOCKERFILE.read_text()
    copied = [
        source
        for line in text.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    ]
    assert copied and all((REPO / source).exists() for source in copied), copied
    for package in ("signaling", "push"):
        assert package in copied
    assert 'ENTRYPOINT ["signaling", "serve"]' in text
