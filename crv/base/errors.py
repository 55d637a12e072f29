"""Errors that say where the problem is and whether a retry can help.

Every crv error carries `temporary`: the Prefect retry condition retries only temporary errors,
so a bad appliance or a refused certificate fails at once instead of burning retries. A temporary
error may also carry `delay`, the seconds the other side asked us to wait (a cloud's
`Retry-After`), as kopf's `TemporaryError(delay=...)`: the retry policy waits at least that long.
"""

from __future__ import annotations


def brief(value: object) -> str:
    """A value as it may appear inside a one-line error: repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class CrvError(Exception):
    """Base of every error crv raises on purpose; its message is one line for the user."""

    temporary: bool = False
    delay: float | None = None  # seconds to wait before trying again, when the cause said so


class TemporaryError(CrvError):
    """A failure the same call may get past later (a busy or restarting peer, a rate limit)."""

    temporary = True

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(CrvError):
    """A failure no retry helps (a refusal, a bad request): it is reported at once."""

    temporary = False


class SpecError(CrvError):
    """A bad appliance, parameter or override: names the file and the field at fault.

    `file` is the document the user must edit (or `--set` for a command-line override) and
    `field` the dotted path inside it, so the CLI prints `error: <file>: <field>: <what>`.
    """

    def __init__(self, file: str, field: str, message: str) -> None:
        self.file = file
        self.field = field
        self.message = " ".join(message.split())  # one line, whatever the source said
        super().__init__(f"{file}: {field}: {self.message}" if field else f"{file}: {self.message}")


class PlanError(SpecError):
    """The appliance is valid on its own but cannot be expanded (cycles, sizes, name lengths)."""


class PkiError(CrvError):
    """A CA operation was refused: bad CSR, unsafe key file, names that break the identity."""
