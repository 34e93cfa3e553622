"""The one exception type users see."""

from __future__ import annotations


class AuditError(ValueError):
    """Bad input or an impossible request, with a message fit for one line.

    The message names the file or option, what was expected and what was found.
    The CLI prints it on stderr and exits with status 1 (``usage`` errors: 2); the
    library raises it and never exits the process.
    """

    def __init__(self, message: str, *, usage: bool = False, param: str | None = None) -> None:
        super().__init__(message)
        self.usage = usage
        self.param = param  # the library parameter the message begins with; the CLI names its flag


def bad_param(param: str, message: str) -> AuditError:
    """A usage error about library parameter ``param``: "param: message"."""
    return AuditError(f"{param}: {message}", usage=True, param=param)
