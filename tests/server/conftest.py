"""Servers on OS-chosen localhost ports, always stopped after the test."""

from __future__ import annotations

import pytest

from jaxserve.client import Client
from jaxserve.server.server import ServerHandle, serve
from tests.server.mock_engine import MockEngine


class Running:
    def __init__(self, handle: ServerHandle, engine: MockEngine):
        self.handle = handle
        self.engine = engine
        self.client = Client(handle.target)


@pytest.fixture
def start():
    """start(engine=None, ready=True, **serve_kwargs) -> Running (handle, engine, client)."""
    running: list[Running] = []

    def _start(engine: MockEngine | None = None, *, ready: bool = True, **kwargs) -> Running:
        engine = engine or MockEngine()
        kwargs.setdefault("grace_s", 5.0)
        r = Running(serve(engine, "127.0.0.1", 0, **kwargs), engine)
        running.append(r)
        if ready:
            r.handle.wait_ready(timeout=20)
        return r

    yield _start
    for r in running:
        r.client.close()
        r.handle.stop()
        assert r.handle.wait(timeout=10), "server thread did not stop"


@pytest.fixture
def server(start) -> Running:
    return start()
