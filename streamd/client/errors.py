"""What a producer call raises: every error says whether any of the call's events were written."""

from __future__ import annotations

from streamd.errors import StreamdError


class ProducerError(StreamdError):
    """A producer call failed; the message says whether any events were written."""


class InvalidEvent(ProducerError, ValueError):
    """An event breaks the envelope contract; nothing of its call was sent."""


class BacklogFull(ProducerError):
    """The backlog stayed above max_backlog for backlog_timeout_s; nothing of the call was sent."""

    def __init__(self, message: str, backlog: int) -> None:
        super().__init__(message)
        self.backlog = backlog


class PartialBatch(ProducerError):
    """Redis refused a chunk of a batch after earlier chunks were written."""

    def __init__(self, message: str, written_ids: list[str]) -> None:
        super().__init__(message)
        self.written_ids = written_ids
