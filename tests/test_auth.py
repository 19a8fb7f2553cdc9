"""Public-key registration tokens end to end: ES256 and RS256 verified with SIPLITE_JWT_PUBLIC_KEY_FILE, the
`aud` and `iss` the server is configured to require, and the classic forgeries (a token signed by another key,
`alg: none`, and an HS256 token keyed with the server's own public key) refused with 401 and close 4401."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signaling.auth import TokenVerifier, issue_token
from signaling.client import ClientError
from signaling.clock import ManualClock
from signaling.errors import AuthenticationFailed
from signaling.store import MemoryStore
from tests.harness import Harness, make_settings, running

AUDIENCE = "sip-lite"
ISSUER = "https://backend.example.com"


@dataclass(frozen=True)
class KeyPair:
    algorithm: str
    private_pem: str
    public_pem: str
    public_file: Path


def generate(algorithm: str) -> tuple[str, str]:
    """A fresh (private, public) PEM pair: P-256 for ES256, 2048-bit RSA for RS256."""
    key = (
        ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else rsa.generate_private_key(65537, 2048)
    )
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private.decode(), public.decode()


@pytest.fixture(scope="module", params=["ES256", "RS256"])
def keys(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """The app backend's key pair; the server is given only the public half, as a PEM file."""
    algorithm: str = request.param
    private, public = generate(algorithm)
    path = tmp_path_factory.mktemp("jwt-keys") / f"{algorithm}.pub.pem"
    path.write_text(public)
    return KeyPair(algorithm, private, public, path)


@asynccontextmanager
async def public_key_server(keys: KeyPair, **overrides: Any) -> AsyncIterator[Harness]:
    clock = ManualClock()
    settings = make_settings(
        jwt_secret=None,
        jwt_public_key_file=str(keys.public_file),
        jwt_audience=AUDIENCE,
        jwt_issuer=ISSUER,
        **overrides,
    )
    async with running(settings, MemoryStore(clock), clock) as harness:
        yield harness


def signed(keys: KeyPair, harness: Harness, **claims: Any) -> str:
    """A token as the app backend signs it, with the required `aud` and `iss` unless `claims` override them."""
    fields: dict[str, Any] = {"audience": AUDIENCE, "issuer": ISSUER, "ttl": 600, **claims}
    return issue_token("alice", key=keys.private_pem, algorithm=keys.algorithm, now=harness.clock.now(), **fields)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_public_key(keys: KeyPair, now: float) -> str:
    """Algorithm confusion: an HS256 token whose HMAC secret is the server's public key PEM, which an attacker has.
    Built by hand, because PyJWT rightly refuses to sign it."""
    claims = {"sub": "alice", "exp": int(now) + 600, "aud": AUDIENCE, "iss": ISSUER}
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(keys.public_pem.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def unsigned(keys: KeyPair, harness: Harness) -> str:
    claims = {"sub": "alice", "exp": int(harness.clock.now()) + 600, "aud": AUDIENCE, "iss": ISSUER}
    return jwt.encode(claims, "", algorithm="none")


async def test_a_token_signed_by_the_backends_private_key_registers(keys: KeyPair) -> None:
    async with public_key_server(keys) as harness:
        client = await harness.connect()
        response = await client.register(signed(keys, harness), "alice-phone")
        assert (response["code"], response["user"]) == (200, "alice")
        assert [b.device_id for b in (await harness.board.store.presence("alice")).bindings] == ["alice-phone"]


MakeToken = Callable[[KeyPair, Harness], str]
FORGERIES: list[tuple[MakeToken, str]] = [
    (lambda keys, h: signed(replace(keys, private_pem=generate(keys.algorithm)[0]), h), "signature invalid"),
    (lambda keys, h: signed(keys, h, audience="another-app"), "audience not accepted"),
    (lambda keys, h: signed(keys, h, audience=None), "lacks the 'aud' claim"),
    (lambda keys, h: signed(keys, h, issuer="https://evil.example.com"), "issuer not accepted"),
    (lambda keys, h: signed(keys, h, issuer=None), "lacks the 'iss' claim"),
    (lambda keys, h: signed(keys, h, ttl=-120), "expired"),
    (unsigned, "algorithm not accepted"),
    (lambda keys, h: hs256_with_public_key(keys, h.clock.now()), "algorithm not accepted"),
]


@pytest.mark.parametrize(
    ("make_token", "detail"),
    FORGERIES,
    ids=["other-key", "wrong-aud", "no-aud", "wrong-iss", "no-iss", "expired", "alg-none", "hs256-public-key"],
)
async def test_forged_and_misdirected_tokens_get_401_and_close_4401(
    keys: KeyPair, make_token: MakeToken, detail: str
) -> None:
    async with public_key_server(keys) as harness:
        client = await harness.connect()
        with pytest.raises(ClientError) as refused:
            await client.register(make_token(keys, harness), "alice-phone")
        assert (refused.value.code, refused.value.error) == (401, "auth_failed")
        assert detail in refused.value.response["detail"]
        assert (await client.wait_closed()).code == 4401
        assert (await harness.board.store.presence("alice")).bindings == ()


def test_hs256_keyed_with_the_public_key_fails_even_where_hs256_is_accepted(keys: KeyPair) -> None:
    """Settings refuse HS256 beside a public key (test_cli); should a verifier be built that way all the same, it
    still never takes the public key for an HMAC secret."""
    clock = ManualClock()
    verifier = TokenVerifier(key=keys.public_pem, algorithms=(keys.algorithm, "HS256"), clock=clock)
    with pytest.raises(AuthenticationFailed):
        verifier.verify(hs256_with_public_key(keys, clock.now()))
    genuine = issue_token("alice", key=keys.private_pem, algorithm=keys.algorithm, now=clock.now())
    assert verifier.verify(genuine).user_id == "alice"
