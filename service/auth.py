"""The API key check both front ends make (HTTP and gRPC): `authorization: Bearer KEY`,
the scheme's case free as HTTP's auth schemes are (RFC 9110 §11.1), the key compared in
constant time so its bytes cannot be found by timing."""

from __future__ import annotations

import hmac


def bearer_token(header: str | None) -> str | None:
    """The token of `Bearer TOKEN`, or None for a missing header or another scheme."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def token_matches(token: str | None, *keys: str | None) -> bool:
    """`token` is one of `keys` (None keys never match)."""
    return token is not None and any(
        key is not None and hmac.compare_digest(token.encode(), key.encode()) for key in keys
    )
