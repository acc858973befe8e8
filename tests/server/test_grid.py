"""PollingGrid: replies collected as they come, the late ones left out at the timeout."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import Message, MessageType, RecordDict

from server.grid import PollingGrid

pytestmark = pytest.mark.usefixtures("task_identity")


class _FakeGrid:
    """Answers message ``i`` after ``delays[i]`` seconds; counts pulls."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.pulls = 0
        self.sent: dict[str, tuple[float, Message]] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            ids.append(f"m{i}")
            self.sent[f"m{i}"] = (time.monotonic() + self.delays[i], msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        now, replies = time.monotonic(), []
        for mid in message_ids:
            due, _ = self.sent[mid]
            if due <= now:
                reply = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                replies.append(reply)
        return replies


def _messages(n: int) -> list[Message]:
    return [
        Message(RecordDict(), dst_node_id=i + 1, message_type=MessageType.TRAIN) for i in range(n)
    ]


def test_replies_arrive_within_a_poll_of_the_slowest_and_late_ones_are_dropped() -> None:
    # Prepare: replies after 0.0 s and 0.3 s; a third never in time
    fake = _FakeGrid([0.0, 0.3, 60.0])
    grid = PollingGrid(fake, poll_interval=0.05)  # type: ignore[arg-type]

    # Execute
    start = time.monotonic()
    replies = list(grid.send_and_receive(_messages(3), timeout=0.6))
    waited = time.monotonic() - start

    # Assert: two replies, the exchange ended at the timeout, not at Flower's 3 s poll
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.55 <= waited < 1.0
    assert fake.pulls >= 8


def test_all_replies_end_the_exchange_early() -> None:
    fake = _FakeGrid([0.0, 0.1])
    grid = PollingGrid(fake, poll_interval=0.05)  # type: ignore[arg-type]
    start = time.monotonic()
    assert len(list(grid.send_and_receive(_messages(2), timeout=30))) == 2
    assert time.monotonic() - start < 1.0


def test_poll_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        PollingGrid(_FakeGrid([]), poll_interval=0.0)  # type: ignore[arg-type]
