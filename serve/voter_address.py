"""The client address a battle's vote is also scored under (feedback/voter_scores.py), so a
stuffer who drops the session cookie before each battle still adds up to one voter.

Only behind a configured trusted proxy (ARENA_TRUSTED_PROXIES): there the address is the one
the proxy names, or the peer's for a request that came past it. Without one every visitor
of a reverse-proxied deployment would share the proxy's address, so no address is kept.
The archive never holds the address itself: a keyed hash (HMAC-SHA256 with the session
secret) of the address as the rate limits count it (an IPv6 client by its /64).
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import Scope

from serve.rate_limit import address_key

PREFIX = "address:"  # a voter named by address, never mistaken for a session id (hex)
DIGEST_CHARS = 20  # 80 bits: no two clients of one deployment collide in practice


class VoterAddress:
    def __init__(self, secret: str, enabled: bool) -> None:
        self.key = secret.encode()
        self.enabled = enabled

    def __call__(self, scope: Scope) -> str:
        """`address:<keyed hash>` of the request's client, or "" (no trusted proxy set)."""
        client = scope.get("client")
        if not self.enabled or not client:
            return ""
        digest = hmac.new(self.key, address_key(client[0]).encode(), hashlib.sha256)
        return PREFIX + digest.hexdigest()[:DIGEST_CHARS]
