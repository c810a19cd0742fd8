"""Error types that front ends map to user-facing answers (CLI exit codes, HTTP 4xx, gRPC codes)."""

from __future__ import annotations


class PremierError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidRequestError(PremierError, ValueError):
    """A generation request (or one of its fields) is invalid; `field` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def located(self, prefix: str) -> "InvalidRequestError":
        """The same error (same type) with its field placed inside a batch, e.g. 'requests[3].'."""
        self.field = prefix + self.field
        self.args = (f"{self.field}: {self.message}",)
        return self


class UnknownUserError(InvalidRequestError):
    """A user id that the model (or store) does not hold."""

    def __init__(self, user_id: str, known: list[str] | None = None):
        hint = ""
        if known is not None:
            shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
            hint = f" (known users: {shown})" if known else " (this checkpoint holds no users)"
        super().__init__("user", f"unknown user {user_id!r}{hint}")
        self.user_id = user_id


class InvalidEmbeddingError(PremierError, ValueError):
    """A user embedding with the wrong shape or non-finite values."""


class ModelLoadError(PremierError, FileNotFoundError):
    """A model folder that is missing files or cannot be loaded."""


class CheckpointError(PremierError, ValueError):
    """A Premier checkpoint that is malformed, corrupt, or does not fit the base model."""
