"""The error every refused or failed kernel start raises: an HTTP status for REST clients, and what to do."""

from __future__ import annotations

from tornado import web


class ProvisionerError(web.HTTPError):
    """A refused or failed kernel start: an HTTP status for REST clients, and a message saying what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)  # no format args: jupyter_server's API replies carry it verbatim
        self.message = message

    def __str__(self) -> str:
        return self.message
