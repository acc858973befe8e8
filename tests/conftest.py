"""Fixtures shared by the test packages."""

from __future__ import annotations

import pytest


@pytest.fixture
def task_identity() -> None:
    """Stamp Flower messages with a task identity, as inside a running ServerApp/ClientApp."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
