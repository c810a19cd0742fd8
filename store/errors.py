"""Store-specific errors, on top of the core's (InvalidRequestError, UnknownUserError, CheckpointMismatchError...).

Bad input to the store raises the core's types so front ends map it the usual way (CLI exit 2,
HTTP 4xx); a store that cannot be opened or read raises StoreError (CLI exit 3).
"""

from __future__ import annotations

from premier.errors import PremierError


class StoreError(PremierError, RuntimeError):
    """The store's database cannot be opened, is not a Premier store, or is damaged."""


class StoreBusyError(StoreError):
    """Another writer held the database lock for longer than the busy timeout."""


__all__ = ["StoreError", "StoreBusyError"]
