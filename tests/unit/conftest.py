from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable

import pytest

from core_helpers import ServerThread, make_app, standard_system


@pytest.fixture
def arun() -> Any:
    """Run a coroutine to completion (the core's tests need no event-loop plugin)."""

    def run(coro: Awaitable[Any]) -> Any:
        return asyncio.run(coro)  # type: ignore[arg-type]

    return run


@pytest.fixture
def app(tmp_path: Path) -> Any:
    app = make_app(tmp_path / "qubes.db")
    yield app
    if app.store is not None:
        app.store.close()


@pytest.fixture
def system(app: Any, arun: Any) -> Any:
    """An app with the standard qubes (see core_helpers.standard_system)."""
    return arun(standard_system(app))


@pytest.fixture
def server(tmp_path: Path) -> Any:
    with ServerThread(tmp_path, setup=standard_system) as srv:
        yield srv
