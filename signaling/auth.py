"""Who is on a connection: JWTs issued by the app backend, verified here. Identity never comes from a frame.

A token names the user in `sub` (and optionally a display name in `name`) and must carry `exp`. HS256 tokens are
signed with a secret the app backend shares with SIP-lite; ES256/RS256 tokens with the backend's private key,
verified here with its public key. Expiry is checked against the injected clock, so it can be tested exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jwt

from signaling.clock import Clock
from signaling.errors import AuthenticationFailed
from signaling.wire import is_user_id


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    name: str | None
    expires_at: float


class TokenVerifier:
    """Verifies registration tokens. Raises `AuthenticationFailed` with a reason safe to show the client."""

    def __init__(
        self,
        *,
        key: str,
        algorithms: tuple[str, ...],
        clock: Clock,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 30.0,
    ) -> None:
        if not algorithms:
            raise ValueError("at least one JWT algorithm is required")
        if any(a.lower() == "none" for a in algorithms):
            raise ValueError("unsigned tokens (alg 'none') are never accepted")
        self._key = key
        self._algorithms = list(algorithms)
        self._clock = clock
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway

    def verify(self, token: str) -> Identity:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                # Time claims are checked below against the injected clock.
                options={
                    "require": ["exp", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": self._audience is not None,
                    "verify_iss": self._issuer is not None,
                },
            )
        except jwt.InvalidAlgorithmError:
            raise AuthenticationFailed("token algorithm not accepted") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationFailed("token signature invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationFailed(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationFailed("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationFailed("token issuer not accepted") from None
        except jwt.PyJWTError:
            raise AuthenticationFailed("token malformed") from None
        now = self._clock.now()
        exp = claims["exp"]
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise AuthenticationFailed("token 'exp' must be a number")
        if exp + self._leeway <= now:
            raise AuthenticationFailed("token expired")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf - self._leeway > now:
            raise AuthenticationFailed("token not yet valid")
        sub = claims["sub"]
        if not isinstance(sub, str) or not is_user_id(sub):
            raise AuthenticationFailed("token 'sub' must be 1-128 printable characters without spaces")
        name = claims.get("name")
        if not isinstance(name, str) or not name.strip():
            name = None
        return Identity(user_id=sub, name=name[:128] if name else None, expires_at=float(exp) + self._leeway)


def issue_token(
    user_id: str,
    *,
    key: str,
    algorithm: str = "HS256",
    now: float,
    ttl: float = 3600.0,
    name: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """Sign a registration token, as an app backend would (used by `signaling token` and the tests)."""
    claims: dict[str, Any] = {"sub": user_id, "iat": int(now), "exp": int(now + ttl)}
    if name is not None:
        claims["name"] = name
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, key, algorithm=algorithm)
