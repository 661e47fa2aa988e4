"""The exception classes (and the built-ins they extend), what their messages say, and Rust logs
reaching Python logging."""

from __future__ import annotations

import logging

import pytest

import fleetlink
import fleetlink.errors
from conftest import eventually


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (fleetlink.AuthError, (fleetlink.FleetlinkError,)),
        (fleetlink.NotFound, (fleetlink.FleetlinkError, KeyError, LookupError)),
        (fleetlink.Conflict, (fleetlink.FleetlinkError,)),
        (fleetlink.PermissionDenied, (fleetlink.FleetlinkError,)),
        (fleetlink.InvalidArgument, (fleetlink.FleetlinkError, ValueError)),
        (fleetlink.ConnectionLost, (fleetlink.FleetlinkError,)),
        (fleetlink.Timeout, (fleetlink.FleetlinkError, TimeoutError)),
        (fleetlink.CommandFailed, (fleetlink.FleetlinkError,)),
        (fleetlink.CommandTimeout, (fleetlink.Timeout, fleetlink.FleetlinkError, TimeoutError)),
        (fleetlink.FleetlinkError, (Exception,)),
    ],
)
def test_class_hierarchy(cls: type, bases: tuple[type, ...]) -> None:
    for base in bases:
        assert issubclass(cls, base), f"{cls.__name__} is not a {base.__name__}"
    assert cls.__module__ == "fleetlink.errors"
    assert getattr(fleetlink, cls.__name__) is getattr(fleetlink.errors, cls.__name__)


def test_every_error_class_is_exported() -> None:
    assert set(fleetlink.errors.__all__) <= set(fleetlink.__all__)


def test_not_found_reads_plainly() -> None:
    # KeyError would quote its argument; NotFound prints the message as it is
    assert str(fleetlink.NotFound('unknown device "x"')) == 'unknown device "x"'


def test_not_found_is_caught_as_key_error(client: fleetlink.Client) -> None:
    with pytest.raises(KeyError) as info:
        client.twin("ghost")
    assert str(info.value) == 'server error (ERROR_CODE_NOT_FOUND): unknown device "ghost": provision it with `fleetlink device add ghost`'


def test_invalid_argument_is_caught_as_value_error(client: fleetlink.Client) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        client.telemetry(every="soon")


def test_timeouts_are_caught_as_timeout_error(client: fleetlink.Client) -> None:
    sub = client.subscribe("presence")
    sub.next(3)
    with pytest.raises(TimeoutError):
        sub.next(0.05)


@pytest.mark.parametrize(
    ("call", "cls", "says"),
    [
        (lambda c: c.twin("ghost"), fleetlink.NotFound, 'unknown device "ghost": provision it with'),
        (lambda c: c.job(42), fleetlink.NotFound, "no job 42"),
        (lambda c: c._native.get_command(42), fleetlink.NotFound, "unknown command 42"),
        (lambda c: c.provision("has space"), fleetlink.InvalidArgument, "contains ' ' at byte 3; allowed are"),
        (lambda c: c.devices("online and"), fleetlink.InvalidArgument, "query error at column"),
        (lambda c: c.subscribe("weather"), fleetlink.InvalidArgument, "use telemetry, presence, twin, commands, jobs or query"),
        (lambda c: c.commands("x", state="done"), fleetlink.InvalidArgument, "use queued, delivered, succeeded"),
        (lambda c: c.telemetry(start="last week"), fleetlink.InvalidArgument, "use a datetime, an ISO 8601 string, '-15m'"),
        (lambda c: c.send_command("x", "y"), fleetlink.NotFound, 'unknown device "x"'),
    ],
)
def test_messages_say_what_was_wrong_and_what_to_do(client: fleetlink.Client, call, cls, says) -> None:
    with pytest.raises(cls) as info:
        call(client)
    assert says in str(info.value)
    assert isinstance(info.value, fleetlink.FleetlinkError)


def test_command_result_with_a_negative_timeout(client: fleetlink.Client, make_device) -> None:
    make_device("truck-1").on_command("x", lambda args: 1)
    handle = client.send_command("truck-1", "x")
    with pytest.raises(fleetlink.InvalidArgument, match="timeout must be a number of seconds >= 0, got -1"):
        handle.result(timeout=-1)


def test_command_failed_carries_id_state_and_error(client: fleetlink.Client, make_device) -> None:
    def refuse(args):
        raise PermissionError("door open")

    make_device("truck-1").on_command("drive", refuse)
    with pytest.raises(fleetlink.CommandFailed) as info:
        client.command("truck-1", "drive")
    e = info.value
    assert (e.state, e.error) == ("failed", "PermissionError: door open")
    assert str(e) == f"command {e.command_id} failed: PermissionError: door open"
    [listed] = client.commands("truck-1")
    assert listed["id"] == e.command_id and listed["error"] == e.error


def test_a_bad_server_url_is_invalid_argument() -> None:
    with pytest.raises(fleetlink.InvalidArgument, match="use fleetlink://host:port"):
        fleetlink.connect("fleetlink://nowhere", "t", ca=b"-----BEGIN CERTIFICATE-----\n")


# -- logging ---------------------------------------------------------------------------------


def test_rust_events_reach_python_logging_under_fleetlink_loggers(caplog: pytest.LogCaptureFixture, client: fleetlink.Client) -> None:
    caplog.set_level(logging.INFO, logger="fleetlink")
    creds = client.provision("truck-1")
    with fleetlink.Device.connect(**creds):
        online = eventually(
            lambda: [r for r in caplog.records if r.name.startswith("fleetlink.server") and "device online" in r.getMessage()]
        )
    record = online[0]
    assert record.name == "fleetlink.server.actor"
    assert record.levelno == logging.INFO
    assert "device=truck-1" in record.getMessage()  # tracing fields follow the message
    provisioned = [r for r in caplog.records if "device provisioned" in r.getMessage()]
    assert provisioned and provisioned[0].name == "fleetlink.server.operator"


def test_log_levels_are_filtered_by_python_logging(caplog: pytest.LogCaptureFixture, client: fleetlink.Client) -> None:
    caplog.set_level(logging.WARNING, logger="fleetlink")
    client.provision("truck-1")
    with fleetlink.Device.connect(**client.provision("truck-2")):
        pass
    assert [r for r in caplog.records if r.name.startswith("fleetlink.") and r.levelno < logging.WARNING] == []


def test_init_logging_rejects_an_unknown_level() -> None:
    from fleetlink import _fleetlink

    with pytest.raises(ValueError, match='log level "loud"'):
        _fleetlink.init_logging("loud")
    _fleetlink.init_logging("info")  # later calls change nothing and do not fail


def test_connect_to_a_silent_port_times_out(server: fleetlink.Server) -> None:
    import socket
    import time

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    url = f"fleetlink://127.0.0.1:{silent.getsockname()[1]}"
    try:
        started = time.monotonic()
        with pytest.raises(fleetlink.Timeout):
            fleetlink.connect(url, server.admin_token, ca=server.ca_cert, timeout=0.5)
        with pytest.raises(TimeoutError):
            fleetlink.Device.connect(url, "truck-1", "token", ca=server.ca_cert, timeout=0.5)
        assert time.monotonic() - started < 5
    finally:
        silent.close()
