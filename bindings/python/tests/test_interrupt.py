"""Ctrl-C interrupts a blocking wait: the native side waits without the GIL and wakes to let
Python run its signal handlers."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import fleetlink


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler for the test: a process started in the background of a shell
    without job control inherits SIGINT ignored, and Python then installs none (the test failed
    under `(bash .ci/run &)`)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_interrupts_a_blocking_wait() -> None:
    with fleetlink.Server() as server:
        client = server.connect()
        device = fleetlink.Device.connect(**client.provision("slow-1"))
        release = threading.Event()
        device.on_command("wait", lambda args: release.wait(20) and "done")
        handle = client.send_command("slow-1", "wait", deadline=30)
        timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
        started = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            handle.result(timeout=20)
        assert time.monotonic() - started < 5, "the wait was not interrupted promptly"
        # the command itself goes on and can still be waited for
        release.set()
        assert handle.result(timeout=10) == "done"
        device.close()
        client.close()
