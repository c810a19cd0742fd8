"""Error types that front ends map to user-facing answers: CLI exit codes (`exit_code`, here), HTTP and gRPC
statuses (serving/protocol.py)."""

from __future__ import annotations


class PremierError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidRequestError(PremierError, ValueError):
    """A generation request (or one of its fields) is invalid; `field` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def located(self, prefix: str) -> InvalidRequestError:
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


class CheckpointMismatchError(CheckpointError):
    """A user record fitted against a different stage-1 checkpoint than the one being served or used."""

    def __init__(self, user_id: str, record_checkpoint: str, expected_checkpoint: str):
        super().__init__(
            f"user {user_id!r} was fitted against stage-1 checkpoint {record_checkpoint[:12]}, "
            f"not {expected_checkpoint[:12]}: refit it against this checkpoint"
        )
        self.user_id = user_id
        self.record_checkpoint = record_checkpoint
        self.expected_checkpoint = expected_checkpoint


class TrainingError(PremierError, RuntimeError):
    """Training or fitting stopped on purpose (a NaN loss, a dataset that cannot be used)."""


EXIT_BAD_INPUT = 2
EXIT_LOAD_ERROR = 3
EXIT_STOPPED = 4

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (TrainingError, EXIT_STOPPED),
    (InvalidRequestError, EXIT_BAD_INPUT),
    (InvalidEmbeddingError, EXIT_BAD_INPUT),
    (CheckpointError, EXIT_LOAD_ERROR),
    (ModelLoadError, EXIT_LOAD_ERROR),
)
"""Error type -> exit code; the first match wins."""


def exit_code(error: BaseException) -> int | None:
    """The exit code of an error a command reports in one line, or None for any other (a bug: let it raise)."""
    return next((code for kind, code in EXIT_CODES if isinstance(error, kind)), None)
