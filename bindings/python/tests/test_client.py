"""The embedded server, connecting operators and devices, provisioning, and the fleet views
(devices, query, fleet_table)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

import fleetlink
from conftest import BASE_US, eventually


def test_server_context_manager_exposes_url_token_ca_and_data_dir() -> None:
    with fleetlink.Server() as server:
        assert server.url.startswith("fleetlink://127.0.0.1:")
        port = int(server.url.rsplit(":", 1)[1])
        assert port > 0  # listen="127.0.0.1:0" picked a free port
        assert isinstance(server.admin_token, str) and len(server.admin_token) >= 16
        assert Path(server.ca_cert).read_text().startswith("-----BEGIN CERTIFICATE-----")
        data_dir = Path(server.data_dir)
        assert data_dir.is_dir()
        assert (data_dir / "fleetlink.db").exists()
        assert server.url in repr(server)
    # a temporary data dir is removed when the server stops
    assert not data_dir.exists()


def test_server_close_is_idempotent() -> None:
    server = fleetlink.Server()
    server.close()
    server.close()


def test_server_keeps_a_given_data_dir(tmp_path: Path) -> None:
    with fleetlink.Server(data_dir=tmp_path) as server:
        assert Path(server.data_dir) == tmp_path
    assert (tmp_path / "fleetlink.db").exists()
    assert (tmp_path / "admin.token").exists()


def test_data_survives_a_restart_on_the_same_data_dir(tmp_path: Path) -> None:
    with fleetlink.Server(data_dir=tmp_path) as first:
        token = first.admin_token
        with first.connect() as client:
            creds = client.provision("truck-1", tags={"region": "north"}, attributes={"model": "x7"})
            with fleetlink.Device.connect(**creds) as truck:
                truck.send({"speed": 42.5}, ts=BASE_US)
                truck.flush()
                truck.report({"fw": "1.2"})
            client.set_desired("truck-1", {"mode": "eco"})
            client.put_group("north", ["truck-1"])

    with fleetlink.Server(data_dir=tmp_path) as second:
        assert second.admin_token == token  # admin.token is read back, not recreated
        with second.connect() as client:
            [device] = client.devices()
            assert device["id"] == "truck-1"
            assert device["tags"] == {"region": "north"}
            assert device["attributes"] == {"model": "x7"}
            assert device["groups"] == ["north"]
            assert device["online"] is False
            assert device["point_count"] == 1
            table = client.telemetry("truck-1")
            assert table.column("value").to_pylist() == [42.5]
            twin = client.twin("truck-1")
            assert twin["reported"] == {"fw": "1.2"}
            assert twin["desired"] == {"mode": "eco"}
            # the device token still works against the new address
            with fleetlink.Device.connect(**{**creds, "url": second.url}) as truck:
                truck.send({"speed": 43.0}, ts=BASE_US + 1)
                truck.flush()
            assert client.telemetry("truck-1").column("value").to_pylist() == [42.5, 43.0]


def test_connect_accepts_the_ca_as_path_str_or_pem_bytes(server: fleetlink.Server) -> None:
    for ca in (server.ca_cert, Path(server.ca_cert), Path(server.ca_cert).read_bytes()):
        with fleetlink.connect(server.url, server.admin_token, ca=ca) as client:
            assert client.devices() == []
    with server.connect() as client:
        assert client.devices() == []


def test_connect_with_a_wrong_admin_token_raises_auth_error(server: fleetlink.Server) -> None:
    with pytest.raises(fleetlink.AuthError, match="wrong admin token"):
        fleetlink.connect(server.url, "not-the-token", ca=server.ca_cert)


def test_connect_without_a_ca_says_what_is_missing(server: fleetlink.Server) -> None:
    with pytest.raises(fleetlink.InvalidArgument, match="ca is required"):
        fleetlink.connect(server.url, server.admin_token)
    with pytest.raises(fleetlink.InvalidArgument, match="cannot read the CA certificate"):
        fleetlink.connect(server.url, server.admin_token, ca="/nonexistent/ca.pem")


def test_connect_to_a_bad_url_raises_invalid_argument(server: fleetlink.Server) -> None:
    with pytest.raises(fleetlink.InvalidArgument, match="server url"):
        fleetlink.connect("fleetlink://no-such-host.invalid:7447", server.admin_token, ca=server.ca_cert)


def test_provision_returns_credentials_for_device_connect(client: fleetlink.Client, server: fleetlink.Server) -> None:
    creds = client.provision("truck-1", tags={"region": "north"}, attributes={"model": "x7", "year": 2021})
    assert set(creds) == {"url", "device_id", "token", "ca"}
    assert creds["url"] == server.url
    assert creds["device_id"] == "truck-1"
    assert isinstance(creds["token"], str) and creds["token"]
    assert creds["ca"] == Path(server.ca_cert).read_bytes()
    with fleetlink.Device.connect(**creds) as truck:
        assert truck.id == "truck-1"
        [device] = client.devices()
        assert device["online"] is True
        assert device["attributes"] == {"model": "x7", "year": 2021}
        assert device["tags"] == {"region": "north"}


def test_provision_many_creates_every_device_or_none(client: fleetlink.Client, server: fleetlink.Server) -> None:
    client.provision("taken")
    with pytest.raises(fleetlink.Conflict, match="device taken already exists"):
        client.provision_many(["pump-1", {"id": "taken"}, "pump-2"])
    with pytest.raises(fleetlink.InvalidArgument, match="pump-1 is given twice"):
        client.provision_many(["pump-1", "pump-1"])
    with pytest.raises(TypeError, match="device id must be a str, not int"):
        client.provision_many([{"id": 7}])
    with pytest.raises(TypeError, match=r"unknown device field\(s\) \['tag'\]"):
        client.provision_many([{"id": "pump-1", "tag": {}}])
    with pytest.raises(ValueError, match="1 to 1000 devices, not 1001"):
        client.provision_many(f"pump-{i}" for i in range(1001))
    assert [d["id"] for d in client.devices()] == ["taken"]

    creds = client.provision_many(
        ["pump-2", {"id": "pump-1", "tags": {"site": "north"}, "attributes": {"kw": 7}}, *(f"valve-{i}" for i in range(998))]
    )
    assert len(creds) == 1000
    assert [c["device_id"] for c in creds[:3]] == ["pump-2", "pump-1", "valve-0"]
    assert creds[1]["url"] == server.url and creds[1]["ca"] == Path(server.ca_cert).read_bytes()
    assert len({c["token"] for c in creds}) == 1000
    with fleetlink.Device.connect(**creds[1]) as pump:
        assert pump.id == "pump-1"
        [info] = [d for d in client.devices() if d["id"] == "pump-1"]
        assert info["tags"] == {"site": "north"} and info["attributes"] == {"kw": 7}
        assert info["online"] is True
    assert len(client.devices()) == 1001


def test_device_stats_say_connected_once_connect_returned(client: fleetlink.Client, server: fleetlink.Server) -> None:
    # Regression (found by this test, fixed): DeviceClient::connect returns with its session established, but the counters
    # start at zero and the background engine sets connects/connected a moment later, so about
    # one call in three sees {"connected": False, "connects": 0} right after connect returned.
    # Thirty devices make the race visible.
    seen = []
    for n in range(30):
        with fleetlink.Device.connect(**client.provision(f"truck-{n}")) as truck:
            stats = truck.stats()
            seen.append((stats["connected"], stats["connects"], stats["zero_rtt_connects"]))
    # A first connection has no session to resume, so no 0-RTT.
    assert seen == [(True, 1, 0)] * 30


def test_device_connect_for_an_unknown_device_raises_not_found(server: fleetlink.Server) -> None:
    with pytest.raises(fleetlink.NotFound, match='unknown device "ghost"'):
        fleetlink.Device.connect(server.url, "ghost", "some-token", ca=server.ca_cert)


def test_device_connect_with_a_wrong_token_raises_auth_error(client: fleetlink.Client, server: fleetlink.Server) -> None:
    client.provision("truck-1")
    with pytest.raises(fleetlink.AuthError, match='wrong token for device "truck-1"'):
        fleetlink.Device.connect(server.url, "truck-1", "wrong-token", ca=server.ca_cert)


def test_provision_rejects_a_bad_device_id(client: fleetlink.Client) -> None:
    with pytest.raises(fleetlink.InvalidArgument, match='device id "bad id!"'):
        client.provision("bad id!")


def test_provisioning_a_device_twice_raises_conflict(client: fleetlink.Client) -> None:
    # Regression (found by this test, fixed): the server answers ERROR_CODE_ALREADY_EXISTS, which errors.rs does not map, so the user
    # gets the bare FleetlinkError and cannot catch "already exists" specifically.
    client.provision("truck-1")
    with pytest.raises(fleetlink.Conflict, match="already exists"):
        client.provision("truck-1")


def test_devices_lists_presence_tags_groups_and_last_values(client: fleetlink.Client, make_device) -> None:
    truck = make_device("truck-1", tags={"region": "north"})
    make_device("truck-2", tags={"region": "south"})
    client.provision("truck-3", tags={"region": "north"})  # never connects
    client.put_group("convoy", ["truck-1", "truck-2"])
    truck.send({"speed": 50.0, "gear": 3, "on": True, "note": "ok", "pos": (52.1, 4.3)}, ts=BASE_US)
    truck.flush()

    devices = {d["id"]: d for d in client.devices()}
    assert sorted(devices) == ["truck-1", "truck-2", "truck-3"]
    one = devices["truck-1"]
    assert one["online"] is True
    assert one["tags"] == {"region": "north"}
    assert one["groups"] == ["convoy"]
    assert one["point_count"] == 5
    assert one["last_seen_us"] > 0
    last = one["last_values"]
    assert last["speed"] == 50.0 and last["gear"] == 3 and last["on"] is True and last["note"] == "ok"
    assert (last["pos"]["lat"], last["pos"]["lon"]) == (52.1, 4.3)
    assert devices["truck-3"]["online"] is False
    assert devices["truck-3"]["last_seen_us"] is None


def test_devices_query_and_query_select_by_the_query_language(client: fleetlink.Client, make_device) -> None:
    north = make_device("truck-1", tags={"region": "north"})
    make_device("truck-2", tags={"region": "south"})
    client.provision("truck-3", tags={"region": "north"})
    north.send({"fuel": 0.1})
    north.flush()

    assert [d["id"] for d in client.devices('tag.region == "north"')] == ["truck-1", "truck-3"]
    assert [d["id"] for d in client.query('tag.region == "north" and online')] == ["truck-1"]
    assert [d["id"] for d in client.query("metric.fuel < 0.2")] == ["truck-1"]
    assert [d["id"] for d in client.query("offline")] == ["truck-3"]
    assert client.query("false") == []
    with pytest.raises(fleetlink.InvalidArgument, match="query error at column"):
        client.query("tag.==")


def test_devices_reflect_a_disconnect(client: fleetlink.Client, make_device) -> None:
    truck = make_device("truck-1")
    truck.close()
    device = eventually(lambda: [d for d in client.devices() if not d["online"]])[0]
    assert device["offline_reason"] == "closed"


def test_fleet_table_has_one_row_per_device_with_tag_and_last_columns(client: fleetlink.Client, make_device) -> None:
    one = make_device("truck-1", tags={"region": "north", "model": "x7"})
    two = make_device("truck-2", tags={"region": "south", "model": "x7"})
    one.send({"speed": 50.0, "fuel": 0.5}, ts=BASE_US)
    two.send({"speed": 20.0, "fuel": 0.9}, ts=BASE_US)
    one.flush()
    two.flush()

    table = client.fleet_table()
    assert isinstance(table, pa.Table)
    assert table.num_rows == 2
    assert table.column("id").to_pylist() == ["truck-1", "truck-2"]
    assert table.column("online").to_pylist() == [True, True]
    assert table.column("tag.region").to_pylist() == ["north", "south"]
    assert table.column("tag.model").to_pylist() == ["x7", "x7"]
    assert table.column("last.speed").to_pylist() == [50.0, 20.0]
    assert table.column("last.fuel").to_pylist() == [0.5, 0.9]
    assert table.column("point_count").to_pylist() == [2, 2]
    assert table.schema.field("last_seen").type == pa.timestamp("us", tz="UTC")

    north = client.fleet_table('tag.region == "north"')
    assert north.column("id").to_pylist() == ["truck-1"]


def test_fleet_table_keeps_tags_and_metrics_that_the_first_device_lacks(client: fleetlink.Client, make_device) -> None:
    # Regression (found by this test, fixed): fleet_table builds the table with pa.Table.from_pylist(rows), which takes its columns
    # from the first row only: a tag or metric the first device does not have is dropped.
    make_device("a-plain")
    tagged = make_device("b-tagged", tags={"region": "north"})
    tagged.send({"speed": 5.0})
    tagged.flush()
    table = client.fleet_table()
    assert table.column("id").to_pylist() == ["a-plain", "b-tagged"]
    assert "tag.region" in table.column_names, table.column_names
    assert table.column("tag.region").to_pylist() == [None, "north"]
    assert table.column("last.speed").to_pylist() == [None, 5.0]


def test_fleet_table_of_an_empty_fleet_has_its_columns(client: fleetlink.Client) -> None:
    # Regression (found by this test, fixed): the columns are inferred from the rows: with no device (or no match) the table has no
    # columns at all, so t["id"] or a polars select on it fails.
    empty = client.fleet_table()
    assert empty.num_rows == 0
    assert {"id", "online", "last_seen", "offline_reason", "point_count", "groups"} <= set(empty.column_names), empty.schema


def test_fleet_table_columns_have_stable_types(client: fleetlink.Client) -> None:
    # Regression (found by this test, fixed): the column types are inferred from the values: offline_reason (all None) is typed
    # null and groups (all empty) list<null>, so two snapshots cannot be concatenated and
    # string operations on offline_reason fail.
    client.provision("truck-1")
    table = client.fleet_table()
    assert table.schema.field("id").type == pa.string()
    assert table.schema.field("online").type == pa.bool_()
    assert table.schema.field("offline_reason").type == pa.string()
    assert table.schema.field("groups").type == pa.list_(pa.string())
    assert table.schema.field("point_count").type == pa.int64()


def test_put_group_static_and_dynamic(client: fleetlink.Client, make_device) -> None:
    make_device("truck-1", tags={"region": "north"})
    make_device("truck-2", tags={"region": "south"})
    client.put_group("pair", ["truck-1", "truck-2"])
    client.put_group("north", query='tag.region == "north"')
    groups = {d["id"]: d["groups"] for d in client.devices()}
    assert sorted(groups["truck-1"]) == ["north", "pair"]
    assert groups["truck-2"] == ["pair"]
    assert [d["id"] for d in client.query('group == "north"')] == ["truck-1"]
    with pytest.raises(fleetlink.NotFound, match='unknown device "ghost"'):
        client.put_group("bad", ["ghost"])
    with pytest.raises(fleetlink.InvalidArgument, match="group name"):
        client.put_group("bad name!", ["truck-1"])


def test_operations_on_a_closed_client_raise_connection_lost(server: fleetlink.Server) -> None:
    client = server.connect()
    client.close()
    with pytest.raises(fleetlink.ConnectionLost):
        client.devices()


def test_device_and_client_are_context_managers(server: fleetlink.Server) -> None:
    with server.connect() as client:
        with fleetlink.Device.connect(**client.provision("truck-1")) as truck:
            truck.send({"x": 1.0})
            truck.flush()
        with pytest.raises(fleetlink.ConnectionLost, match="closed"):
            truck.send({"x": 2.0})
        assert eventually(lambda: not client.devices()[0]["online"])
    assert os.path.exists(server.data_dir)
