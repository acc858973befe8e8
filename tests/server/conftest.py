"""Fixtures of the server tests: a grid that answers with replies the test makes."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from flwr.app import Message

Replies = Callable[[list[Message]], list[Message]]


class FakeGrid:
    """Answers ``send_and_receive`` with ``replies(messages)``; has the nodes it was given."""

    def __init__(self, replies: Replies, nodes: Iterable[int] = (1, 2, 3)) -> None:
        self.replies = replies
        self.nodes = list(nodes)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float) -> list[Message]:
        self.sent = list(messages)
        return self.replies(self.sent)


@pytest.fixture
def fake_grid() -> type[FakeGrid]:
    """The :class:`FakeGrid` class: ``fake_grid(replies_fn, nodes)``."""
    return FakeGrid
