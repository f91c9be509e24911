"""Bearer tokens for ``aimass serve``: scopes, per-model allow lists and a token bucket per token.

tokens.yml stores only the sha256 of each token, never the token itself::

    tokens:
      - name: ci                      # shown in logs, never the token
        sha256: 9f86d081884c7d65...   # hex sha256 of the token (aimass serve-token prints one)
        scopes: [infer]               # infer, admin, metrics
        models: [mlp]                 # optional: only these models (default: all)
        rate: 50                      # requests per second (optional, default unlimited)
        burst: 100                    # bucket size (optional, default max(1, rate))

A request sends ``Authorization: Bearer <token>``. Missing or unknown token: 401; wrong scope or
model: 403; over the token's rate: 429 with ``Retry-After``.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional

SCOPES = frozenset({"infer", "admin", "metrics"})


class AuthError(Exception):
    """An authentication/authorization failure carrying its HTTP status (401, 403, 429)."""

    def __init__(self, status: int, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class TokenBucket:
    """rate tokens/s refilled up to burst; take() returns 0 when allowed, else seconds to wait."""
    rate: float
    burst: float
    level: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        if self.level < 0:
            self.level = self.burst

    def take(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


@dataclass
class Token:
    name: str
    digest: bytes
    scopes: FrozenSet[str]
    models: Optional[FrozenSet[str]]
    bucket: Optional[TokenBucket]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (URL-safe, 256 bits)."""
    return "aimass_" + secrets.token_urlsafe(32)


def _num(entry: dict, key: str, where: str) -> Optional[float]:
    v = entry.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{where}: '{key}' must be a positive number, got {v!r}")
    return float(v)


class TokenTable:
    """The parsed tokens.yml. authorize() raises AuthError or returns the matching Token."""

    def __init__(self, tokens: Dict[bytes, Token]):
        self._tokens = tokens

    def __len__(self):
        return len(self._tokens)

    @classmethod
    def load(cls, path) -> "TokenTable":
        import yaml
        path = os.fspath(path)
        try:
            with open(path, "r", encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(doc, path)

    @classmethod
    def from_dict(cls, doc, where: str = "tokens") -> "TokenTable":
        if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list) or not doc["tokens"]:
            raise ValueError(f"{where}: expected a mapping with a non-empty 'tokens' list "
                             "(each: name, sha256, scopes, optional models, rate, burst)")
        out: Dict[bytes, Token] = {}
        names = set()
        for i, e in enumerate(doc["tokens"]):
            w = f"{where}: tokens[{i}]"
            if not isinstance(e, dict):
                raise ValueError(f"{w}: expected a mapping, got {type(e).__name__}")
            unknown = set(e) - {"name", "sha256", "scopes", "models", "rate", "burst"}
            if unknown:
                raise ValueError(f"{w}: unknown keys {sorted(unknown)}")
            name = str(e.get("name") or f"token{i}")
            if name in names:
                raise ValueError(f"{w}: duplicate name {name!r}")
            names.add(name)
            hexd = e.get("sha256")
            if not isinstance(hexd, str) or len(hexd) != 64 or any(c not in "0123456789abcdefABCDEF" for c in hexd):
                raise ValueError(f"{w} ({name}): 'sha256' must be the 64-hex-digit sha256 of the token "
                                 "(never the token itself); `aimass serve-token` prints one")
            scopes = e.get("scopes", ["infer"])
            if isinstance(scopes, str):
                scopes = [scopes]
            if not isinstance(scopes, list) or not scopes or set(scopes) - SCOPES:
                raise ValueError(f"{w} ({name}): 'scopes' must be a non-empty list drawn from {sorted(SCOPES)}, "
                                 f"got {scopes!r}")
            models = e.get("models")
            if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
                raise ValueError(f"{w} ({name}): 'models' must be a list of model names, got {models!r}")
            rate, burst = _num(e, "rate", f"{w} ({name})"), _num(e, "burst", f"{w} ({name})")
            if burst is not None and rate is None:
                raise ValueError(f"{w} ({name}): 'burst' needs a 'rate'")
            bucket = TokenBucket(rate, burst if burst is not None else max(1.0, rate)) if rate else None
            digest = bytes.fromhex(hexd)
            if digest in out:
                raise ValueError(f"{w} ({name}): the same token hash is listed twice")
            out[digest] = Token(name, digest, frozenset(scopes), frozenset(models) if models is not None else None,
                                bucket)
        return cls(out)

    def authorize(self, header: Optional[str], scope: str, model: Optional[str] = None) -> Token:
        if not header:
            raise AuthError(401, "missing token: send 'Authorization: Bearer <token>'")
        kind, _, value = header.partition(" ")
        if kind.lower() != "bearer" or not value.strip():
            raise AuthError(401, "malformed Authorization header: expected 'Bearer <token>'")
        digest = hashlib.sha256(value.strip().encode()).digest()
        tok = self._tokens.get(digest)
        # dict lookup by digest; compare_digest keeps the final equality constant-time
        if tok is None or not hmac.compare_digest(tok.digest, digest):
            raise AuthError(401, "unknown token")
        if scope not in tok.scopes and not (scope == "metrics" and "admin" in tok.scopes):
            raise AuthError(403, f"token '{tok.name}' lacks scope '{scope}' (has {sorted(tok.scopes)})")
        if model is not None and tok.models is not None and model not in tok.models:
            raise AuthError(403, f"token '{tok.name}' may not use model '{model}'")
        if tok.bucket is not None:
            wait = tok.bucket.take()
            if wait > 0:
                raise AuthError(429, f"token '{tok.name}' is over its rate of {tok.bucket.rate:g} requests/s "
                                f"(burst {tok.bucket.burst:g})", retry_after=wait)
        return tok
