"""Fixtures: a real embedded server per test (QUIC on 127.0.0.1, a temporary data dir), an
operator client of it, and a factory of connected devices. Nothing here sleeps to synchronise:
tests wait on events with deadlines (``Device.flush``, ``Subscription.next(timeout)``,
``CommandHandle.result(timeout)``, ``queue.Queue.get(timeout=...)`` or ``eventually``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

import fleetlink

T = TypeVar("T")

BASE_US = 1_700_000_000_000_000
"""2023-11-14 22:13:20 UTC, a whole multiple of 10 s: downsampling buckets start here."""


def eventually(check: Callable[[], T], timeout: float = 3.0, interval: float = 0.01) -> T:
    """Calls ``check`` until it returns something truthy (returned) or ``timeout`` passes
    (``AssertionError`` with the last value or exception)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except AssertionError as e:
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s; last: {last!r}")
        time.sleep(interval)  # polling with a deadline, not synchronisation by sleeping


def next_event(sub: fleetlink.Subscription, kind: str, timeout: float = 3.0, **match: Any) -> dict[str, Any]:
    """The next event of ``kind`` whose fields equal ``match``, skipping others; fails after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {kind} event matching {match} within {timeout} s; saw {seen}")
        try:
            event = sub.next(left)
        except fleetlink.Timeout:
            continue
        assert event is not None, f"the stream ended while waiting for a {kind} event; saw {seen}"
        if event["event"] == kind and all(event.get(k) == v for k, v in match.items()):
            return event
        seen.append(event)


def events_until_quiet(sub: fleetlink.Subscription, quiet: float = 0.3, limit: int = 100) -> list[dict[str, Any]]:
    """Every event until none came for ``quiet`` seconds."""
    out = []
    for _ in range(limit):
        try:
            event = sub.next(quiet)
        except fleetlink.Timeout:
            break
        if event is None:
            break
        out.append(event)
    return out


class BackgroundCall:
    """Runs ``fn`` on a daemon thread; keeps its result or exception, so a failing thread never
    becomes an unhandled-thread-exception warning (an error under this pytest configuration)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as e:  # noqa: BLE001 - kept for the test to look at
                self.error = e
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)


@pytest.fixture
def server() -> Iterator[fleetlink.Server]:
    """A fresh embedded server with a temporary data dir, stopped after the test."""
    with fleetlink.Server() as s:
        yield s


@pytest.fixture
def client(server: fleetlink.Server) -> Iterator[fleetlink.Client]:
    """An operator connected to ``server`` with the admin token."""
    c = fleetlink.connect(server.url, server.admin_token, ca=server.ca_cert)
    yield c
    c.close()


@pytest.fixture
def make_device(client: fleetlink.Client) -> Iterator[Callable[..., fleetlink.Device]]:
    """``make_device("truck-1", tags={...})``: provisions a device and connects it; every device
    made is closed after the test."""
    made: list[fleetlink.Device] = []

    def make(device_id: str, tags: dict[str, str] | None = None, attributes: dict[str, Any] | None = None) -> fleetlink.Device:
        creds = client.provision(device_id, tags=tags, attributes=attributes)
        device = fleetlink.Device.connect(**creds)
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


@pytest.fixture
def release(client: fleetlink.Client) -> Iterator[threading.Event]:
    """An event that blocking command handlers wait on; set after the test whatever happened
    (before the server stops), so no handler thread outlives it."""
    event = threading.Event()
    yield event
    event.set()
