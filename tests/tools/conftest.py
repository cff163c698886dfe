"""Fixtures for the client and tool tests: an App on a fake transport (see toolfakes.py)."""

from __future__ import annotations

import pytest

from bulkhead.client import App
from toolfakes import FakeConnection


@pytest.fixture
def conn() -> FakeConnection:
    return FakeConnection()


@pytest.fixture
def app(conn: FakeConnection) -> App:
    return App(conn)
