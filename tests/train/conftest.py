"""Fixtures for the multi-process channel-loss tests (the launcher lives in tests/procs.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from procs import free_port, spawn


@pytest.fixture
def spawn_ranks() -> Callable[..., None]:
    """The `spawn` launcher, as a fixture."""
    return spawn


@pytest.fixture
def port() -> int:
    """A free port on 127.0.0.1, for a rendezvous."""
    return free_port()
