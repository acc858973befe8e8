"""A Grid that collects replies as they arrive: Flower's networked grid waits 3 s between polls.

In a deployment the ServerApp talks to the SuperLink through Flower 1.42's ``HttpGrid``, whose
``send_and_receive`` sleeps a fixed 3 s between two pulls of the replies
(``flwr/superlink/grid/http_grid.py``, ``time.sleep(3)``), so every exchange of a round lasts
a multiple of 3 s however fast the devices answer. :class:`PollingGrid` wraps any grid and
pulls every ``poll_interval`` seconds instead; the other calls go straight through. A pull is
one small request to the SuperLink on the ServerApp's loopback connection, so polling 5 times
a second costs nothing next to a round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["PollingGrid", "polling"]

POLL_SECONDS = 0.2
"""Default pause between two pulls of replies."""


class PollingGrid(Grid):
    """``grid`` with a ``send_and_receive`` that pulls every ``poll_interval`` seconds.

    Parameters
    ----------
    grid:
        The grid Flower handed to the ServerApp.
    poll_interval:
        Seconds between two pulls (> 0; default 0.2).
    """

    def __init__(self, grid: Grid, *, poll_interval: float = POLL_SECONDS) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self.inner = grid
        self.poll_interval = poll_interval

    def set_run(self, run: Run) -> None:
        """Delegated."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """Delegated."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Delegated."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull replies until all came back or ``timeout`` seconds passed.

        Same contract as Flower's: replies in arrival order, the missing ones left out (a
        node that never answers costs the exchange ``timeout`` seconds and one reply).
        """
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        return replies


def polling(grid: Grid) -> Grid:
    """``grid`` wrapped in a :class:`PollingGrid` when it is a networked (HTTP) grid.

    The simulation engine's in-memory grid already pulls every 0.1 s; it is returned as is.
    """
    from flwr.superlink.grid.http_grid import HttpGrid

    return PollingGrid(grid) if isinstance(grid, HttpGrid) else grid
