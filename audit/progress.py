"""Progress reporting without printing from the library.

Long-running library functions accept ``progress=``, an object with ``start``,
``advance`` and ``close``. The default does nothing; the CLI passes a rich bar.
"""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    def start(self, description: str, total: int) -> None: ...

    def advance(self, n: int, **fields: Any) -> None: ...

    def close(self, summary: str | None = None) -> None: ...


class NullProgress:
    """Reports nothing; the library's default."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int, **fields: Any) -> None:
        pass

    def close(self, summary: str | None = None) -> None:
        pass
