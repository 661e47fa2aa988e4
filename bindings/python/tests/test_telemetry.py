"""Telemetry: Device.send of every kind of value, Client.telemetry as Arrow with filters, time
ranges, downsampling, and its use from polars and pandas."""

from __future__ import annotations

import datetime as dt
import time

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

import fleetlink
from conftest import BASE_US, eventually

SECOND = 1_000_000


@pytest.fixture
def speed_series(make_device) -> fleetlink.Device:
    """truck-1 with speed = 0.0, 1.0, ..., 29.0 at BASE_US + i s (three 10 s buckets)."""
    truck = make_device("truck-1")
    for i in range(30):
        truck.send({"speed": float(i)}, ts=BASE_US + i * SECOND)
    truck.flush()
    return truck


def test_telemetry_schema_constant() -> None:
    assert fleetlink.TELEMETRY_SCHEMA.names == ["device", "metric", "time", "value", "text", "lat", "lon"]
    assert fleetlink.TELEMETRY_SCHEMA.field("time").type == pa.timestamp("us", tz="UTC")
    assert fleetlink.TELEMETRY_SCHEMA.field("value").type == pa.float64()


def test_telemetry_is_a_table_with_exactly_the_telemetry_schema(client: fleetlink.Client, speed_series) -> None:
    # Regression (found by this test, fixed): the native table declares device, metric and time NOT NULL, fleetlink.TELEMETRY_SCHEMA
    # (also used for batched subscriptions) declares them nullable, so the schemas differ and
    # tables from the two sources cannot be concatenated without a cast.
    table = client.telemetry("truck-1")
    assert isinstance(table, pa.Table)
    assert table.schema.names == fleetlink.TELEMETRY_SCHEMA.names
    assert [f.type for f in table.schema] == [f.type for f in fleetlink.TELEMETRY_SCHEMA]
    assert table.schema == fleetlink.TELEMETRY_SCHEMA, f"{table.schema}\n!=\n{fleetlink.TELEMETRY_SCHEMA}"


def test_empty_telemetry_has_the_schema_too(client: fleetlink.Client) -> None:
    client.provision("truck-1")
    table = client.telemetry("truck-1")
    assert table.num_rows == 0
    assert table.schema.names == fleetlink.TELEMETRY_SCHEMA.names


def test_every_kind_of_value_lands_in_its_column(client: fleetlink.Client, make_device) -> None:
    truck = make_device("truck-1")
    truck.send(
        {
            "speed": 42.5,
            "gear": 3,
            "on": True,
            "off": False,
            "note": "all good",
            "pos": (52.1, 4.3),
            "fix": {"lat": 48.85, "lon": 2.35, "alt_m": 35.0, "speed_mps": 1.5},
        },
        ts=BASE_US,
    )
    truck.flush()
    rows = {r["metric"]: r for r in client.telemetry("truck-1").to_pylist()}
    assert sorted(rows) == ["fix", "gear", "note", "off", "on", "pos", "speed"]
    for r in rows.values():
        assert r["device"] == "truck-1"
        assert r["time"] == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.timezone.utc)

    def cols(metric: str) -> tuple:
        r = rows[metric]
        return (r["value"], r["text"], r["lat"], r["lon"])

    assert cols("speed") == (42.5, None, None, None)
    assert cols("gear") == (3.0, None, None, None)
    assert cols("on") == (1.0, None, None, None)
    assert cols("off") == (0.0, None, None, None)
    assert cols("note") == (None, "all good", None, None)
    assert cols("pos") == (None, None, 52.1, 4.3)
    assert cols("fix") == (None, None, 48.85, 2.35)


def test_send_defaults_the_time_to_now(client: fleetlink.Client, make_device) -> None:
    truck = make_device("truck-1")
    before = dt.datetime.now(dt.timezone.utc)
    truck.send({"speed": 1.0})
    truck.flush()
    after = dt.datetime.now(dt.timezone.utc)
    [t] = client.telemetry("truck-1").column("time").to_pylist()
    assert before - dt.timedelta(seconds=1) <= t <= after + dt.timedelta(seconds=1)


def test_send_accepts_a_datetime_or_iso_time(client: fleetlink.Client, make_device) -> None:
    truck = make_device("truck-1")
    truck.send({"a": 1.0}, ts=dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))
    truck.send({"b": 1.0}, ts="2024-01-02T03:04:06Z")
    truck.flush()
    times = {r["metric"]: r["time"] for r in client.telemetry("truck-1").to_pylist()}
    assert times["a"] == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert times["b"] == dt.datetime(2024, 1, 2, 3, 4, 6, tzinfo=dt.timezone.utc)


def test_device_and_metric_filters(client: fleetlink.Client, make_device) -> None:
    one = make_device("truck-1")
    two = make_device("truck-2")
    one.send({"speed": 1.0, "fuel": 0.5}, ts=BASE_US)
    two.send({"speed": 2.0, "fuel": 0.6}, ts=BASE_US)
    one.flush()
    two.flush()

    everything = client.telemetry()
    assert everything.num_rows == 4
    assert sorted(set(everything.column("device").to_pylist())) == ["truck-1", "truck-2"]

    only_two = client.telemetry(devices="truck-2")
    assert set(only_two.column("device").to_pylist()) == {"truck-2"}
    assert only_two.num_rows == 2

    speeds = client.telemetry(metrics="speed")
    assert sorted(zip(speeds.column("device").to_pylist(), speeds.column("value").to_pylist())) == [
        ("truck-1", 1.0),
        ("truck-2", 2.0),
    ]
    both = client.telemetry(devices=["truck-1", "truck-2"], metrics=["fuel"])
    assert sorted(both.column("value").to_pylist()) == [0.5, 0.6]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (dt.datetime(2023, 11, 14, 22, 13, 45, tzinfo=dt.timezone.utc), dt.datetime(2023, 11, 14, 22, 13, 49, tzinfo=dt.timezone.utc)),
        (dt.datetime(2023, 11, 14, 22, 13, 45), dt.datetime(2023, 11, 14, 22, 13, 49)),  # naive = UTC
        ("2023-11-14T22:13:45Z", "2023-11-14T22:13:49+00:00"),
        ("2023-11-14T23:13:45+01:00", "2023-11-14 22:13:49"),
        (BASE_US + 25 * SECOND, BASE_US + 29 * SECOND),
    ],
    ids=["datetime", "naive-datetime", "iso", "iso-offset", "int-us"],
)
def test_start_is_inclusive_and_end_exclusive_in_every_time_form(client: fleetlink.Client, speed_series, start, end) -> None:
    table = client.telemetry("truck-1", "speed", start=start, end=end)
    assert table.column("value").to_pylist() == [25.0, 26.0, 27.0, 28.0]


def test_relative_start(client: fleetlink.Client, make_device) -> None:
    truck = make_device("truck-1")
    now_us = int(time.time() * SECOND)
    truck.send({"speed": 1.0}, ts=now_us - 60 * 60 * SECOND)  # an hour ago
    truck.send({"speed": 2.0}, ts=now_us - 5 * 60 * SECOND)  # five minutes ago
    truck.flush()
    assert client.telemetry("truck-1", start="-15m").column("value").to_pylist() == [2.0]
    assert client.telemetry("truck-1", start="-2h").column("value").to_pylist() == [1.0, 2.0]
    assert client.telemetry("truck-1", end="-15m").column("value").to_pylist() == [1.0]


@pytest.mark.parametrize(
    ("agg", "values"),
    [
        ("mean", [4.5, 14.5, 24.5]),
        ("max", [9.0, 19.0, 29.0]),
        ("min", [0.0, 10.0, 20.0]),
        ("sum", [45.0, 145.0, 245.0]),
        ("count", [10.0, 10.0, 10.0]),
    ],
)
def test_downsampling_every_10s(client: fleetlink.Client, speed_series, agg, values) -> None:
    table = client.telemetry("truck-1", "speed", every="10s", agg=agg)
    assert table.column("value").to_pylist() == values
    assert table.column("time").to_pylist() == [
        dt.datetime(2023, 11, 14, 22, 13, s, tzinfo=dt.timezone.utc) for s in (20, 30, 40)
    ]
    assert set(table.column("metric").to_pylist()) == {"speed"}


def test_every_accepts_timedelta_and_seconds(client: fleetlink.Client, speed_series) -> None:
    by_string = client.telemetry("truck-1", "speed", every="10s", agg="max")
    assert client.telemetry("truck-1", "speed", every=dt.timedelta(seconds=10), agg="max").equals(by_string)
    assert client.telemetry("truck-1", "speed", every=10, agg="max").equals(by_string)
    assert client.telemetry("truck-1", "speed", every="1m", agg="count").column("value").to_pylist() == [30.0]


def test_polars_and_pandas_take_the_table(client: fleetlink.Client, make_device) -> None:
    one = make_device("truck-1")
    two = make_device("truck-2")
    for i in range(10):
        one.send({"speed": float(i)}, ts=BASE_US + i * SECOND)
        two.send({"speed": float(10 * i)}, ts=BASE_US + i * SECOND)
    one.flush()
    two.flush()
    table = client.telemetry(metrics="speed")

    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    assert frame.schema["time"] == pl.Datetime("us", "UTC")
    summary = frame.group_by("device").agg(pl.col("value").max().alias("top"), pl.len().alias("n")).sort("device")
    assert summary.to_dicts() == [{"device": "truck-1", "top": 9.0, "n": 10}, {"device": "truck-2", "top": 90.0, "n": 10}]

    df = table.to_pandas()
    assert isinstance(df, pd.DataFrame)
    assert len(df) == 20
    assert str(df["time"].dt.tz) == "UTC"
    assert df.groupby("device")["value"].mean().to_dict() == {"truck-1": 4.5, "truck-2": 45.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": "fast"}, "every 'fast' is not a duration"),
        ({"every": 0}, "every must be a positive duration"),
        ({"every": "10s", "agg": "median"}, 'unknown aggregation "median"'),
        ({"start": "yesterday"}, "start 'yesterday' is not a time"),
        ({"end": True}, "end must be a time, not a bool"),
        ({"metrics": "bad metric!"}, 'metric "bad metric!"'),
        ({"devices": "bad id!"}, 'device id "bad id!"'),
    ],
)
def test_bad_telemetry_arguments_raise_invalid_argument(client: fleetlink.Client, speed_series, kwargs, message) -> None:
    kwargs.setdefault("devices", "truck-1")
    with pytest.raises(fleetlink.InvalidArgument, match=message) as info:
        client.telemetry(**kwargs)
    assert isinstance(info.value, ValueError)


def test_telemetry_of_an_unknown_device_raises_not_found(client: fleetlink.Client) -> None:
    with pytest.raises(fleetlink.NotFound, match='unknown device "ghost"'):
        client.telemetry("ghost")


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"x": [1, 2]}, 'metric "x": list is not a telemetry value'),
        ({"x": 2**70}, 'metric "x": the integer does not fit in 64 bits'),
        ({"bad name!": 1.0}, 'metric "bad name!"'),
        ({"x": 1.0, 2: 1.0}, "metric names must be str"),
    ],
)
def test_bad_values_raise_invalid_argument(make_device, metrics, message) -> None:
    truck = make_device("truck-1")
    with pytest.raises(fleetlink.InvalidArgument, match=message):
        truck.send(metrics)


def test_a_metric_keeps_its_type(make_device) -> None:
    truck = make_device("truck-1")
    truck.send({"speed": 1.0})
    truck.flush()
    with pytest.raises(fleetlink.InvalidArgument, match="metric speed holds double values, got string"):
        truck.send({"speed": "fast"})
        truck.flush()


def test_flush_with_a_negative_timeout_raises(make_device) -> None:
    truck = make_device("truck-1")
    with pytest.raises(fleetlink.InvalidArgument, match="timeout"):
        truck.flush(-1)


def test_device_stats_count_points(make_device) -> None:
    # Regression (found by this test, fixed): the SDK never increments DeviceStats::points_sent, so stats()["points_sent"] stays 0.
    truck = make_device("truck-1")
    truck.send({"a": 1.0, "b": 2.0, "c": 3.0})
    truck.flush()
    stats = truck.stats()
    assert stats["points_acked"] == 3
    assert stats["points_rejected"] == 0
    assert stats["points_sent"] == 3, stats


def test_long_histories_come_in_column_pages_with_the_right_device_and_metric(client: fleetlink.Client, make_device) -> None:
    # 40,000 speeds take two column pages (32,768 a page) and 5,000 rpms one; the device and
    # metric columns of a page are slices of one shared array per value, of the longest page
    # seen: a shorter page, another device or metric must still read its own name on every row.
    long_name = make_device("truck-with-a-long-name")
    short = make_device("t2")
    for i in range(40_000):
        long_name.send({"speed": float(i), "rpm": i} if i < 5_000 else {"speed": float(i)}, ts=BASE_US + i)
    for i in range(36_000):
        short.send({"speed": -float(i)}, ts=BASE_US + i)
    long_name.flush(timeout=60)
    short.flush(timeout=60)

    table = client.telemetry()
    assert table.num_rows == 81_000
    rows = list(zip(table.column("device").to_pylist(), table.column("metric").to_pylist(), table.column("value").to_pylist()))
    counts: dict[tuple[str, str], int] = {}
    for device, metric, value in rows:
        counts[(device, metric)] = counts.get((device, metric), 0) + 1
        if device == "t2":
            assert metric == "speed" and value <= 0
        else:
            assert metric in ("speed", "rpm") and value >= 0
    assert counts == {("truck-with-a-long-name", "speed"): 40_000, ("truck-with-a-long-name", "rpm"): 5_000, ("t2", "speed"): 36_000}
    for column in ("text", "lat", "lon"):
        assert table.column(column).null_count == 81_000
    polars = pytest.importorskip("polars")
    frame = polars.from_arrow(table)
    assert frame.filter(polars.col("device") == "t2").height == 36_000


def test_ack_coalescing_holds_an_ack_until_a_flush_and_can_be_turned_off(client: fleetlink.Client) -> None:
    with (
        fleetlink.Device.connect(**client.provision("meter-1")) as held,
        fleetlink.Device.connect(**client.provision("meter-2"), ack_coalescing=False) as prompt,
    ):
        for device in (held, prompt):
            device.send({"flow": 1.0}, ts=BASE_US)
            device.flush()  # (a connection's first ack is never held)
            device.send({"flow": 1.5}, ts=BASE_US + 1)
        # both points stored: the prompt device hears so at once, the other's ack is held (2.5 s)
        eventually(lambda: client.telemetry("meter-1").num_rows == 2 and client.telemetry("meter-2").num_rows == 2)
        eventually(lambda: prompt.stats()["points_acked"] == 2)
        assert held.stats()["points_acked"] == 1
        held.flush(timeout=2.0)  # asks for the held ack
        assert held.stats()["points_acked"] == 2


def test_ack_coalescing_acks_at_once_after_the_batches_asked_for(client: fleetlink.Client) -> None:
    with fleetlink.Device.connect(
        **client.provision("meter-3"), telemetry_ack_delay=10.0, telemetry_ack_batches=2
    ) as device:
        device.send({"flow": 1.0}, ts=BASE_US)
        device.flush()  # (a connection's first ack is never held)
        device.send({"flow": 1.5}, ts=BASE_US + 1)
        eventually(lambda: client.telemetry("meter-3").num_rows == 2)
        # one stored batch unacked: the server holds its ack (up to 10 s, or its heartbeat cap)
        assert device.stats()["points_acked"] == 1
        device.send({"flow": 2.0}, ts=BASE_US + 2)
        # the second unacked batch: acked at once, both batches in one ack, long before the hold
        # ends (5 s here; 2.5 s with the default delay, so this also fails if the delay is ignored)
        eventually(lambda: device.stats()["points_acked"] == 3, timeout=1.0)


def test_ack_coalescing_settings_are_checked(client: fleetlink.Client) -> None:
    credentials = client.provision("meter-4")
    with pytest.raises(fleetlink.InvalidArgument, match="telemetry_ack_batches must be at least 1"):
        fleetlink.Device.connect(**credentials, telemetry_ack_batches=0)
    with pytest.raises(fleetlink.InvalidArgument, match="telemetry_ack_delay must be a number of seconds"):
        fleetlink.Device.connect(**credentials, telemetry_ack_delay=-1.0)
    with pytest.raises(fleetlink.InvalidArgument, match="telemetry_ack_delay must be at most 10 s"):
        fleetlink.Device.connect(**credentials, telemetry_ack_delay=11.0)
    with pytest.raises(fleetlink.InvalidArgument, match="ack_coalescing=False"):
        fleetlink.Device.connect(**credentials, ack_coalescing=False, telemetry_ack_batches=3)
    with pytest.raises(TypeError):
        fleetlink.Device.connect(**credentials, telemetry_ack_batches="3")  # type: ignore[arg-type]
    with fleetlink.Device.connect(**credentials, telemetry_ack_delay=0.0) as prompt:
        prompt.send({"flow": 1.0}, ts=BASE_US)
        prompt.flush()
        prompt.send({"flow": 1.5}, ts=BASE_US + 1)
        # no hold: the ack follows the store (the default hold is 2.5 s)
        eventually(lambda: prompt.stats()["points_acked"] == 2, timeout=1.0)
