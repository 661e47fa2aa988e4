"""fleetlink: script an M2M fleet from Python.

>>> import fleetlink
>>> with fleetlink.Server() as server:                     # an embedded server, for notebooks
...     client = fleetlink.connect(server.url, server.admin_token, ca=server.ca_cert)
...     creds = client.provision("truck-1", tags={"region": "north"})
...     truck = fleetlink.Device.connect(**creds)
...     truck.send({"speed_kmh": 42.0, "fuel": 0.61})
...     truck.flush()
...     table = client.telemetry(devices=["truck-1"])       # a pyarrow.Table

Blocking calls release the GIL and can be interrupted with Ctrl-C. ``fleetlink.aio`` has the same
API for asyncio. Errors are the classes of ``fleetlink.errors``.
"""

from __future__ import annotations

import datetime as _dt
import json as _json
import logging as _logging
import re as _re
import shutil as _shutil
import tempfile as _tempfile
import time as _time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as _pa

from . import _fleetlink
from .errors import (
    AuthError,
    CommandFailed,
    CommandTimeout,
    Conflict,
    ConnectionLost,
    FleetlinkError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Timeout,
)

__version__: str = _fleetlink.__version__

_logging.getLogger("fleetlink").addHandler(_logging.NullHandler())
_fleetlink.init_logging("info")

TimeLike = _dt.datetime | str | int | float | None
"""A time: a ``datetime`` (naive = UTC), an ISO 8601 string, a relative string such as ``"-15m"``
(``s``, ``m``, ``h``, ``d``, ``w`` before now), or microseconds since the epoch."""

_UNITS_US = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000,
             "d": 86_400_000_000, "w": 604_800_000_000}
_DURATION = _re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d|w)\s*$")


def _duration_us(value: str | float | int | _dt.timedelta, what: str) -> int:
    if isinstance(value, _dt.timedelta):
        return int(value / _dt.timedelta(microseconds=1))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * 1_000_000)  # seconds
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS_US[m.group(2)])
    raise InvalidArgument(
        f"{what} {value!r} is not a duration: use a timedelta, seconds, or a string like '1m', '15s', '2h'"
    )


def _time_us(value: TimeLike, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidArgument(f"{what} must be a time, not a bool")
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return int(value.timestamp() * 1_000_000)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            return int(_time.time() * 1_000_000) - _duration_us(text[1:], what)
        try:
            return _time_us(_dt.datetime.fromisoformat(text.replace("Z", "+00:00")), what)
        except ValueError:
            pass
    raise InvalidArgument(
        f"{what} {value!r} is not a time: use a datetime, an ISO 8601 string, '-15m', or microseconds since the epoch"
    )


def _ca_pem(ca: str | Path | bytes | None) -> bytes:
    if ca is None:
        raise InvalidArgument("ca is required: the path (or PEM bytes) of the CA certificate that signed the server's")
    if isinstance(ca, bytes):
        return ca
    try:
        return Path(ca).read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read the CA certificate {ca}: {e}") from None


def _dumps(value: Any, what: str) -> str:
    try:
        return _json.dumps(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{what} must be JSON-like (dict, list, str, int, float, bool, None): {e}") from None


def _timeout(timeout: float | None) -> float:
    if timeout is None or timeout < 0:
        raise InvalidArgument(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    return float(timeout)


class Server:
    """A fleetlink server inside this process, for notebooks and tests.

    ``Server(data_dir=None, listen="127.0.0.1:0")``: with no ``data_dir`` it uses a temporary
    directory, removed when the server stops. Use it as a context manager, or call ``close()``.
    """

    def __init__(self, data_dir: str | Path | None = None, listen: str = "127.0.0.1:0") -> None:
        self._tmp = None if data_dir is not None else _tempfile.mkdtemp(prefix="fleetlink-")
        self._native = _fleetlink.Server(str(data_dir if data_dir is not None else self._tmp), listen)

    @property
    def url(self) -> str:
        """``fleetlink://host:port``."""
        return self._native.url

    @property
    def admin_token(self) -> str:
        """The admin token, for ``fleetlink.connect``."""
        return self._native.admin_token

    @property
    def ca_cert(self) -> str:
        """Path of the CA certificate clients must trust."""
        return self._native.ca_cert

    @property
    def data_dir(self) -> str:
        """Where the server keeps its data."""
        return self._native.data_dir

    def connect(self) -> "Client":
        """An operator client of this server."""
        return connect(self.url, self.admin_token, ca=self.ca_cert)

    def close(self) -> None:
        """Stops the server (waiting until everything is written) and removes a temporary data dir."""
        self._native.shutdown()
        if self._tmp is not None:
            _shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fleetlink.Server {self.url} data_dir={self.data_dir!r}>"


class CommandHandle:
    """A command sent with ``Client.send_command``: poll it, wait for it, cancel it."""

    def __init__(self, client: "Client", info: dict[str, Any]) -> None:
        self._client = client
        self.id: int = info["id"]
        self.info: dict[str, Any] = info

    def status(self) -> str:
        """The command's state now: queued, delivered, succeeded, failed, expired, rejected or cancelled."""
        self.info = self._client._native.get_command(self.id)
        return self.info["state"]

    def result(self, timeout: float = 10.0) -> Any:
        """Waits up to ``timeout`` seconds; the result if it succeeded, else raises
        ``CommandFailed`` (or ``CommandTimeout`` if it is still running)."""
        self.info = self._client._native.wait_command(self.id, _timeout(timeout))
        return _outcome(self.info, timeout)

    def cancel(self) -> dict[str, Any]:
        """Cancels it (``Conflict`` if it already finished); returns its record."""
        self.info = self._client._native.cancel_command(self.id)
        return self.info

    def __repr__(self) -> str:
        return f"<fleetlink.CommandHandle {self.id} {self.info.get('name')!r} {self.info.get('state')}>"


def _outcome(info: dict[str, Any], timeout: float) -> Any:
    state = info["state"]
    if state == "succeeded":
        return info.get("result")
    if state in ("queued", "delivered"):
        e = CommandTimeout(
            f"command {info['id']} is still {state} after {timeout} s; it goes on: wait again with its handle, or cancel it"
        )
        e.command_id = info["id"]
        raise e
    e2 = CommandFailed(f"command {info['id']} {state}: {info.get('error') or 'no reason given'}")
    e2.command_id, e2.state, e2.error = info["id"], state, info.get("error")
    raise e2


class Subscription:
    """A live stream: iterate over it for events (dicts with an ``"event"`` key); ``close()`` ends it.

    With ``batch=True`` (telemetry only), iteration yields ``pyarrow.RecordBatch``es of up to
    ``batch_rows`` points (columns device, metric, time, value, text, lat, lon), each as soon as it
    is full or ``batch_interval`` seconds passed.
    """

    def __init__(self, native: Any, batch: bool = False, batch_rows: int = 10_000, batch_interval: float = 1.0) -> None:
        self._native = native
        self._batch = batch
        self._rows = batch_rows
        self._interval = batch_interval

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, None when the stream ended; ``Timeout`` after ``timeout`` seconds."""
        return self._native.next(timeout)

    def __iter__(self) -> Iterator[Any]:
        if not self._batch:
            while (event := self._native.next(None)) is not None:
                yield event
            return
        yield from self._batches()

    def _batches(self) -> Iterator[_pa.RecordBatch]:
        rows: list[dict[str, Any]] = []
        deadline = _time.monotonic() + self._interval
        while True:
            try:
                event = self._native.next(max(0.0, deadline - _time.monotonic()))
            except Timeout:
                event = {"event": "tick"}
            if event is None:
                break
            if event["event"] == "telemetry":
                for p in event["points"]:
                    rows.append(_row(event["device"], p))
            while len(rows) >= self._rows:
                yield _pa.RecordBatch.from_pylist(rows[: self._rows], schema=TELEMETRY_SCHEMA)
                rows = rows[self._rows :]
            if rows and _time.monotonic() >= deadline:
                yield _pa.RecordBatch.from_pylist(rows, schema=TELEMETRY_SCHEMA)
                rows = []
            if _time.monotonic() >= deadline:
                deadline = _time.monotonic() + self._interval
        if rows:
            yield _pa.RecordBatch.from_pylist(rows, schema=TELEMETRY_SCHEMA)

    def close(self) -> None:
        """Ends the stream."""
        self._native.close()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


TELEMETRY_SCHEMA = _pa.schema(
    [
        _pa.field("device", _pa.string(), nullable=False),
        _pa.field("metric", _pa.string(), nullable=False),
        _pa.field("time", _pa.timestamp("us", tz="UTC"), nullable=False),
        ("value", _pa.float64()),
        ("text", _pa.string()),
        ("lat", _pa.float64()),
        ("lon", _pa.float64()),
    ]
)
"""The columns of ``Client.telemetry`` and of batched telemetry subscriptions."""


def _row(device: str, p: dict[str, Any]) -> dict[str, Any]:
    v = p["value"]
    row: dict[str, Any] = {"device": device, "metric": p["metric"], "time": p["time_us"],
                           "value": None, "text": None, "lat": None, "lon": None}
    if isinstance(v, bool):
        row["value"] = 1.0 if v else 0.0
    elif isinstance(v, (int, float)):
        row["value"] = float(v)
    elif isinstance(v, str):
        row["text"] = v
    elif isinstance(v, dict):
        row["lat"], row["lon"] = v.get("lat"), v.get("lon")
    return row


class Client:
    """An operator connected to a fleetlink server (see ``fleetlink.connect``)."""

    def __init__(self, native: Any, url: str, ca: bytes) -> None:
        self._native = native
        self._url = url
        self._ca = ca

    # -- the fleet -------------------------------------------------------------------------

    def devices(self, query: str | None = None) -> list[dict[str, Any]]:
        """Devices (all, or those matching ``query``, see docs/queries.md) as dicts: id, tags,
        attributes, groups, online, last_seen_us, offline_reason, last_values, point_count."""
        return self._native.devices(query)

    def query(self, query: str) -> list[dict[str, Any]]:
        """Devices matching a query, e.g. ``'tag.region == "north" and online and metric.fuel < 0.2'``."""
        return self._native.devices(query)

    def fleet_table(self, query: str | None = None) -> _pa.Table:
        """One row per device: id, online, last_seen (UTC), offline_reason, point_count, groups,
        one ``tag.<key>`` column (string) per tag key of any device, and one ``last.<metric>``
        column per metric: float64 when every value is a number or bool, else string (positions
        as JSON). Columns and types are the same for an empty fleet."""
        devices = self.devices(query)
        tag_keys = sorted({k for d in devices for k in d["tags"]})
        metrics = sorted({k for d in devices for k in d["last_values"]})
        columns: dict[str, _pa.Array] = {
            "id": _pa.array([d["id"] for d in devices], _pa.string()),
            "online": _pa.array([d["online"] for d in devices], _pa.bool_()),
            "last_seen": _pa.array([d["last_seen_us"] for d in devices], _pa.timestamp("us", tz="UTC")),
            "offline_reason": _pa.array([d["offline_reason"] for d in devices], _pa.string()),
            "point_count": _pa.array([d["point_count"] for d in devices], _pa.int64()),
            "groups": _pa.array([d["groups"] for d in devices], _pa.list_(_pa.string())),
        }
        for k in tag_keys:
            columns[f"tag.{k}"] = _pa.array([d["tags"].get(k) for d in devices], _pa.string())
        for m in metrics:
            values = [d["last_values"].get(m) for d in devices]
            numeric = all(v is None or isinstance(v, (int, float)) for v in values)
            if numeric:
                columns[f"last.{m}"] = _pa.array([None if v is None else float(v) for v in values], _pa.float64())
            else:
                columns[f"last.{m}"] = _pa.array(
                    [None if v is None else (v if isinstance(v, str) else _json.dumps(v)) for v in values], _pa.string()
                )
        return _pa.table(columns)

    def telemetry(
        self,
        devices: Sequence[str] | str | None = None,
        metrics: Sequence[str] | str | None = None,
        start: TimeLike = None,
        end: TimeLike = None,
        every: str | float | _dt.timedelta | None = None,
        agg: str = "mean",
    ) -> _pa.Table:
        """Stored telemetry as a ``pyarrow.Table`` with columns device, metric, time (UTC),
        value (float64: numbers, ints, bools as 1/0), text (strings), lat, lon (positions).

        ``every="1m"`` downsamples on the server: one row per device, metric and minute with
        ``agg`` ("mean", "min", "max", "sum", "count") of the numeric values. Built as Arrow in
        Rust and handed over through the Arrow C stream interface: no Python object per row.
        ``polars.from_arrow(t)`` and ``t.to_pandas()`` work on the result.
        """
        if isinstance(devices, str):
            devices = [devices]
        if isinstance(metrics, str):
            metrics = [metrics]
        stream = self._native.telemetry(
            list(devices) if devices is not None else None,
            list(metrics) if metrics is not None else None,
            _time_us(start, "start"),
            _time_us(end, "end"),
            _duration_us(every, "every") if every is not None else None,
            agg,
        )
        return _pa.RecordBatchReader.from_stream(stream).read_all()

    def provision(
        self,
        device_id: str,
        tags: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Creates a device. Returns its credentials, ready for ``Device.connect(**creds)``:
        url, device_id, token (shown once: the server keeps only a hash) and ca."""
        token = self._native.provision(device_id, dict(tags or {}), _dumps(dict(attributes or {}), "attributes"))
        return {"url": self._url, "device_id": device_id, "token": token, "ca": self._ca}

    def provision_many(self, devices: Iterable[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Creates up to 1000 devices in one server transaction: all of them or, if any id is
        taken, given twice or invalid, none (and raises). Each device is an id or a mapping with
        ``id`` and optional ``tags`` and ``attributes``. Returns their credentials in order, as
        ``provision`` does. Import a larger fleet in several calls, keeping each call's
        credentials (the tokens are shown once)."""
        rows = []
        for d in devices:
            if isinstance(d, str):
                rows.append((d, {}, "{}"))
            elif isinstance(d, Mapping):
                unknown = set(d) - {"id", "tags", "attributes"}
                if unknown:
                    raise TypeError(f"unknown device field(s) {sorted(unknown)} (id, tags, attributes)")
                if not isinstance(d.get("id"), str):
                    raise TypeError(f"device id must be a str, not {type(d.get('id')).__name__}")
                rows.append((d["id"], dict(d.get("tags") or {}), _dumps(dict(d.get("attributes") or {}), "attributes")))
            else:
                raise TypeError(f"a device is an id or a mapping, not {type(d).__name__}")
        if not 1 <= len(rows) <= 1000:
            raise ValueError(f"provision_many takes 1 to 1000 devices, not {len(rows)}: call it once per batch")
        tokens = self._native.provision_many(rows)
        return [
            {"url": self._url, "device_id": row[0], "token": token, "ca": self._ca}
            for row, token in zip(rows, tokens)
        ]

    def put_group(self, name: str, members: Sequence[str] = (), query: str | None = None) -> None:
        """Creates or replaces a group: static (``members``) or dynamic (``query``)."""
        self._native.put_group(name, list(members), query)

    # -- twins -----------------------------------------------------------------------------

    def twin(self, device: str) -> dict[str, Any]:
        """The device's twin: reported, desired, delta, reported_version, desired_version and
        the per-field update times (reported_metadata, desired_metadata)."""
        return self._native.twin(device)

    def set_desired(self, device: str, patch: Mapping[str, Any], version: int | None = None) -> dict[str, Any]:
        """Merges ``patch`` into the desired document (``None`` deletes a field). With ``version``,
        raises ``Conflict`` unless the desired document is at that version. Returns the twin."""
        return self._native.set_desired(device, _dumps(dict(patch), "patch"), version)

    # -- commands --------------------------------------------------------------------------

    def command(self, device: str, name: str, args: Any = None, timeout: float = 10.0) -> Any:
        """Runs a command and returns its result; raises ``CommandFailed`` if it failed, was
        rejected, expired or cancelled, and ``CommandTimeout`` if it is still running after
        ``timeout`` seconds (it also expires then)."""
        # The command expires on the server a second after the wait ends, so a result that
        # arrives just in time is not lost to a racing expiry.
        handle = self.send_command(device, name, args, deadline=_timeout(timeout) + 1.0)
        return handle.result(timeout)

    def send_command(
        self,
        device: str,
        name: str,
        args: Any = None,
        *,
        deadline: float | None = None,
        idempotency_key: str | None = None,
        concurrent: bool = False,
        wait: bool = False,
        timeout: float = 10.0,
    ) -> CommandHandle:
        """Queues a command and returns a handle at once (``wait=True``: after it finished or
        ``timeout`` passed). ``deadline``: seconds until it expires (default: the server's)."""
        wait_s = _timeout(timeout) if wait else None
        info = self._native.send_command(device, name, _dumps(args, "args"), deadline, idempotency_key, concurrent, wait_s)
        return CommandHandle(self, info)

    def commands(self, device: str, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """A device's commands, newest first."""
        return self._native.list_commands(device, state, limit)

    # -- streams, bridge, jobs -------------------------------------------------------------

    def subscribe(
        self,
        stream: str = "telemetry",
        query: str | None = None,
        metrics: Sequence[str] | None = None,
        job: int = 0,
        batch: bool = False,
        batch_rows: int = 10_000,
        batch_interval: float = 1.0,
    ) -> Subscription:
        """A live stream: "telemetry" (filtered by ``query`` and ``metrics``), "presence",
        "twin", "commands", "jobs" (``job`` = one job) or "query" (a standing query: the initial
        set, then ``enter``/``leave`` events). A reader that falls behind gets an ``overflow``
        event with the number of events it missed."""
        if batch and stream != "telemetry":
            raise InvalidArgument("batch=True is for telemetry streams")
        native = self._native.subscribe(stream, query or "", list(metrics or []), job)
        return Subscription(native, batch, batch_rows, batch_interval)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> str:
        """Publishes to a topic as an operator."""
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        return self._native.publish(topic, data, retain)

    def create_job(
        self,
        query: str,
        *,
        command: str | None = None,
        args: Any = None,
        desired: Mapping[str, Any] | None = None,
        name: str = "",
        timeout: float | None = None,
        max_in_flight: int = 10,
        max_per_minute: int = 0,
        abort_failure_ratio: float = 0.0,
        abort_min_finished: int = 0,
    ) -> dict[str, Any]:
        """Runs ``command`` (or merges ``desired``) on every device matching ``query``, at most
        ``max_in_flight`` at once and ``max_per_minute`` per minute; aborts when the failed share
        of finished targets passes ``abort_failure_ratio``. Returns its progress."""
        return self._native.create_job(
            query, name, command, _dumps(args, "args"), timeout,
            _dumps(dict(desired), "desired") if desired is not None else None,
            max_in_flight, max_per_minute, abort_failure_ratio, abort_min_finished,
        )

    def job(self, job_id: int) -> dict[str, Any]:
        """A job's progress: state, targets, counts per target state, reason."""
        return self._native.job(job_id)

    def cancel_job(self, job_id: int) -> dict[str, Any]:
        """Cancels a running job."""
        return self._native.cancel_job(job_id)

    @property
    def jobs(self) -> list[dict[str, Any]]:
        """Every job, newest first."""
        return self._native.jobs()

    def close(self) -> None:
        """Closes the connection."""
        self._native.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    url: str,
    token: str,
    ca: str | Path | bytes | None = None,
    *,
    server_name: str = "localhost",
    timeout: float = 10.0,
) -> Client:
    """Connects an operator to ``url`` (``fleetlink://host:port``) with an admin token, trusting
    the CA certificate ``ca`` (a path or PEM bytes); ``Timeout`` after ``timeout`` seconds."""
    pem = _ca_pem(ca)
    return Client(_fleetlink.Client.connect(url, token, pem, server_name, _timeout(timeout)), url, pem)


class Device:
    """A device written in Python: the Rust SDK underneath buffers points, resends what the
    server did not acknowledge, reconnects by itself and runs each command handler once."""

    def __init__(self, native: Any) -> None:
        self._native = native

    @classmethod
    def connect(
        cls,
        url: str,
        device_id: str,
        token: str,
        ca: str | Path | bytes | None = None,
        *,
        server_name: str = "localhost",
        commands: Mapping[str, Callable[[Any], Any]] | None = None,
        timeout: float = 10.0,
        ack_coalescing: bool = True,
        telemetry_ack_delay: float | None = None,
        telemetry_ack_batches: int | None = None,
    ) -> "Device":
        """Connects and authenticates (``AuthError`` for a wrong token, ``NotFound`` for an
        unknown device). ``Device.connect(**client.provision(...))`` works. ``commands`` maps
        command names to handlers that are in place before the first command arrives (commands
        queued while the device was offline come right after connecting). ``ack_coalescing``
        lets the server hold its acknowledgement of stored points up to ``telemetry_ack_delay``
        seconds (2.5 by default, at most 10; the server caps it at half its heartbeat interval)
        or until ``telemetry_ack_batches`` stored batches are unacknowledged (3 by default; 1 = no
        coalescing), one packet for several messages (``flush`` still gets its acknowledgement at
        once); ``False`` has every batch acknowledged as soon as it is stored."""
        native = _fleetlink.Device.connect(
            url,
            device_id,
            token,
            _ca_pem(ca),
            server_name,
            dict(commands or {}),
            _timeout(timeout),
            ack_coalescing,
            telemetry_ack_delay,
            telemetry_ack_batches,
        )
        return cls(native)

    @property
    def id(self) -> str:
        """The device's id."""
        return self._native.id

    def send(self, metrics: Mapping[str, Any], ts: TimeLike = None, timeout: float | None = None) -> None:
        """Queues one reading per metric, all at time ``ts`` (default: now). Values: bool, int,
        float, str, or a position as ``(lat, lon)`` or a dict with lat, lon and optionally alt_m,
        speed_mps, heading_deg, accuracy_m. Waits while the send buffer (100,000 unacknowledged
        points) is full, at most ``timeout`` seconds (``None``: as long as it takes)."""
        when = _time_us(ts, "ts")
        now = int(_time.time() * 1_000_000)
        self._native.send(dict(metrics), when if when is not None else now, None if timeout is None else _timeout(timeout))

    def flush(self, timeout: float = 10.0) -> None:
        """Waits until the server stored everything sent so far (``Timeout`` after ``timeout`` s)."""
        self._native.flush(_timeout(timeout))

    def report(self, patch: Mapping[str, Any]) -> int:
        """Merges ``patch`` into the reported twin (``None`` deletes a field); returns its version."""
        return self._native.report(_dumps(dict(patch), "patch"))

    def on_desired(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Calls ``callback(state)`` now and on every change of the desired twin; ``state`` has
        version, delta (what differs from reported) and desired. Runs on a fleetlink thread."""
        self._native.on_desired(callback)

    def on_command(self, name: str, handler: Callable[[Any], Any]) -> None:
        """Runs ``handler(args)`` for command ``name``; its return value (JSON-like) is the
        result, an exception fails the command with its text. Runs on a fleetlink thread, once
        per command even when the server delivers it again."""
        self._native.on_command(name, handler)

    def command(self, name: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
        """Decorator form of ``on_command``."""

        def register(handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
            self.on_command(name, handler)
            return handler

        return register

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> int:
        """Publishes to a topic (``PermissionDenied`` if the policy forbids it); returns how many
        subscribers got it."""
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        return self._native.publish(topic, data, retain)

    def subscribe(self, topic: str) -> None:
        """Subscribes to a topic filter (``+`` one level, ``#`` the rest); read with ``messages()``."""
        self._native.subscribe(topic)

    def send_direct(self, to: str, payload: bytes | str, ttl: float | None = None) -> int:
        """Sends a message to another device; it waits up to ``ttl`` seconds if that one is offline."""
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        return self._native.send_direct(to, data, ttl)

    def next_message(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next bridge message (kind "topic", "direct" or "expired"), None after ``timeout`` s."""
        return self._native.next_message(timeout)

    def messages(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Bridge messages as they come; stops after ``timeout`` seconds without one."""
        while (m := self._native.next_message(timeout)) is not None:
            yield m

    def stats(self) -> dict[str, Any]:
        """Counters: points_sent, points_acked, points_rejected, acked_seq, connects, zero_rtt_connects, connected, last_error, commands_handled, command_redeliveries."""
        return self._native.stats()

    def close(self) -> None:
        """Closes the connection (call ``flush`` first to keep unacknowledged points)."""
        self._native.close()

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "AuthError",
    "Client",
    "CommandFailed",
    "CommandHandle",
    "CommandTimeout",
    "Conflict",
    "ConnectionLost",
    "Device",
    "FleetlinkError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Server",
    "Subscription",
    "TELEMETRY_SCHEMA",
    "Timeout",
    "connect",
]
