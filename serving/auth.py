"""The optional API key, held once per ingress process.

Ray Serve may ship the ingress class and its FastAPI app to the replica by value, which gives
their functions copies of module globals; so the key lives here and callers import this module
when they run (the real module from sys.modules), never a captured global.
"""

from __future__ import annotations

import hmac

_state: dict[str, str | bool | None] = {"key": None, "public_docs": False}


def set_key(key: str | None, public_docs: bool = False) -> None:
    _state["key"] = key or None
    _state["public_docs"] = public_docs


def docs_public() -> bool:
    """/docs and /openapi.json: open with `public_docs`, else they follow the key rule like the API."""
    return bool(_state["public_docs"])


def enabled() -> bool:
    return _state["key"] is not None


def accepts(token: str | None) -> bool:
    """True without a key, or when `token` (the part after 'Bearer ') is the key (constant-time compare)."""
    key = _state["key"]
    return key is None or (token is not None and hmac.compare_digest(token.encode(), key.encode()))


def accepts_header(value: str | None) -> bool:
    """The same for a whole 'Authorization' header / gRPC metadata value."""
    if not enabled():
        return True
    scheme, _, token = (value or "").partition(" ")
    return scheme.lower() == "bearer" and accepts(token.strip())
