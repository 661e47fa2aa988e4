"""fleetlink.aio: the same API with coroutines, async handlers and `async for` streams. Each test
runs its coroutine with asyncio.run under a deadline."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Coroutine
from typing import Any

import pyarrow as pa
import pytest

import fleetlink
import fleetlink.aio as aio
from conftest import BASE_US


def run(coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def connect(server: fleetlink.Server) -> aio.AsyncClient:
    return await aio.connect(server.url, server.admin_token, ca=server.ca_cert)


def test_connect_provision_device_send_flush_telemetry(server: fleetlink.Server) -> None:
    async def main() -> None:
        async with await connect(server) as client:
            creds = await client.provision("truck-1", tags={"region": "north"})
            async with await aio.Device.connect(**creds) as truck:
                assert truck.id == "truck-1"
                for i in range(5):
                    await truck.send({"speed": float(i)}, ts=BASE_US + i * 1_000_000)
                await truck.flush()
                assert truck.stats()["points_acked"] == 5
                table = await client.telemetry("truck-1", "speed")
                assert isinstance(table, pa.Table)
                assert table.column("value").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0]
                agg = await client.telemetry("truck-1", "speed", every="10s", agg="sum")
                assert agg.column("value").to_pylist() == [10.0]
                assert [d["id"] for d in await client.devices()] == ["truck-1"]
                assert [d["id"] for d in await client.query('tag.region == "north"')] == ["truck-1"]
                fleet = await client.fleet_table()
                assert fleet.column("last.speed").to_pylist() == [4.0]

    run(main())


def test_provision_many(server: fleetlink.Server) -> None:
    async def main() -> None:
        async with await connect(server) as client:
            creds = await client.provision_many(f"truck-{i}" for i in range(3))
            assert [c["device_id"] for c in creds] == ["truck-0", "truck-1", "truck-2"]
            async with await aio.Device.connect(**creds[2]) as truck:
                assert truck.id == "truck-2"
            with pytest.raises(fleetlink.Conflict, match="truck-0 already exists"):
                await client.provision_many(["truck-9", "truck-0"])
            assert [d["id"] for d in await client.devices()] == ["truck-0", "truck-1", "truck-2"]

    run(main())


def test_auth_errors(server: fleetlink.Server) -> None:
    async def main() -> None:
        with pytest.raises(fleetlink.AuthError):
            await aio.connect(server.url, "wrong", ca=server.ca_cert)
        with pytest.raises(fleetlink.NotFound):
            await aio.Device.connect(server.url, "ghost", "t", ca=server.ca_cert)

    run(main())


def test_command_with_an_async_handler(server: fleetlink.Server) -> None:
    async def main() -> None:
        client = await connect(server)
        truck = await aio.Device.connect(**await client.provision("truck-1"))
        loop = asyncio.get_running_loop()
        ran_on_loop = []

        async def honk(args: Any) -> dict[str, Any]:
            ran_on_loop.append(asyncio.get_running_loop() is loop)
            await asyncio.sleep(0)  # a real await inside the handler
            return {"honked": args["times"]}

        async def fail(args: Any) -> None:
            raise RuntimeError("horn broken")

        truck.on_command("honk", honk)
        truck.on_command("fail", fail)
        truck.on_command("sync", lambda args: "plain functions work too")
        assert await client.command("truck-1", "honk", {"times": 3}) == {"honked": 3}
        assert ran_on_loop == [True]
        assert await client.command("truck-1", "sync") == "plain functions work too"
        with pytest.raises(fleetlink.CommandFailed, match="horn broken") as info:
            await client.command("truck-1", "fail")
        assert info.value.state == "failed"

        handle = await client.send_command("truck-1", "honk", {"times": 1})
        assert isinstance(handle, aio.AsyncCommandHandle)
        assert await handle.result(timeout=5) == {"honked": 1}
        assert await handle.status() == "succeeded"
        assert handle.info["state"] == "succeeded"
        with pytest.raises(fleetlink.Conflict):
            await handle.cancel()
        assert [c["name"] for c in await client.commands("truck-1", state="failed")] == ["fail"]
        await truck.close()
        await client.close()

    run(main())


def test_the_event_loop_runs_while_a_command_is_awaited(server: fleetlink.Server) -> None:
    async def main() -> None:
        client = await connect(server)
        truck = await aio.Device.connect(**await client.provision("truck-1"))
        gate = asyncio.Event()

        async def wait_for_gate(args: Any) -> str:
            await gate.wait()
            return "through"

        truck.on_command("gate", wait_for_gate)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 20:
                    gate.set()  # only the running loop can open the gate
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        try:
            assert await client.command("truck-1", "gate", timeout=5) == "through"
        finally:
            tick_task.cancel()
        assert ticks >= 20
        await truck.close()
        await client.close()

    run(main())


def test_twin_and_async_desired_callback(server: fleetlink.Server) -> None:
    async def main() -> None:
        client = await connect(server)
        truck = await aio.Device.connect(**await client.provision("truck-1"))
        assert await truck.report({"mode": "normal"}) == 1
        states: asyncio.Queue = asyncio.Queue()

        async def on_desired(state: dict[str, Any]) -> None:
            await states.put(state)

        truck.on_desired(on_desired)
        assert (await asyncio.wait_for(states.get(), 3))["version"] == 0
        twin = await client.set_desired("truck-1", {"mode": "eco"})
        assert twin["delta"] == {"mode": "eco"}
        state = await asyncio.wait_for(states.get(), 3)
        assert state == {"version": 1, "delta": {"mode": "eco"}, "desired": {"mode": "eco"}}
        with pytest.raises(fleetlink.Conflict):
            await client.set_desired("truck-1", {"mode": "x"}, version=0)
        assert (await client.twin("truck-1"))["reported"] == {"mode": "normal"}
        await truck.close()
        await client.close()

    run(main())


def test_subscribe_with_async_for(server: fleetlink.Server) -> None:
    async def main() -> None:
        client = await connect(server)
        truck = await aio.Device.connect(**await client.provision("truck-1"))
        sub = await client.subscribe("telemetry", metrics=["speed"])
        assert isinstance(sub, aio.AsyncSubscription)
        assert (await sub.next(3))["event"] == "subscribed"
        await truck.send({"speed": 12.5, "fuel": 0.3}, ts=BASE_US)
        await truck.flush()
        async for event in sub:
            assert event["event"] == "telemetry"
            assert event["points"] == [{"metric": "speed", "time_us": BASE_US, "value": 12.5}]
            break
        with pytest.raises(fleetlink.Timeout):
            await sub.next(0.1)
        await sub.close()

        async with await client.subscribe("telemetry", batch=True, batch_interval=0.1) as batched:
            await truck.send({"speed": 1.0})
            await truck.flush()
            async for batch in batched:
                assert isinstance(batch, pa.RecordBatch)
                assert batch.column(1).to_pylist() == ["speed"]
                break
        await truck.close()
        await client.close()

    run(main())


def test_bridge_groups_and_jobs(server: fleetlink.Server) -> None:
    async def main() -> None:
        client = await connect(server)
        a = await aio.Device.connect(**await client.provision("a"))
        b = await aio.Device.connect(**await client.provision("b"))
        await client.put_group("g", ["a", "b"])
        await b.subscribe("group/g/#")
        assert await a.publish("group/g/x", "hello") == 1
        message = await b.next_message(3)
        assert (message["topic"], message["payload"]) == ("group/g/x", b"hello")
        await a.send_direct("b", b"psst")
        got = [m async for m in b.messages(timeout=0.3)]
        assert [(m["kind"], m["payload"]) for m in got] == [("direct", b"psst")]
        with pytest.raises(fleetlink.PermissionDenied):
            await a.publish("group/h/x", "no")
        assert "1" in await client.publish("group/g/y", "op")

        async def update(args: Any) -> str:
            return "ok"

        a.on_command("update", update)
        b.on_command("update", update)
        job = await client.create_job('group == "g"', command="update")
        sub = await client.subscribe("jobs", job=job["id"])
        async for event in sub:
            if event["event"] == "job" and event["state"] == "completed":
                break
        await sub.close()
        assert (await client.job(job["id"]))["counts"]["succeeded"] == 2
        for device in (a, b):
            await device.close()
        await client.close()

    run(main())


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


PAIRS = pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [
        (fleetlink.Client, aio.AsyncClient),
        (fleetlink.Device, aio.Device),
        (fleetlink.CommandHandle, aio.AsyncCommandHandle),
        (fleetlink.Subscription, aio.AsyncSubscription),
    ],
)


@PAIRS
def test_aio_has_every_method_of_fleetlink(sync_cls: type, async_cls: type) -> None:
    # Regression (found by this test, fixed): fleetlink.aio says it has "the API of fleetlink"; AsyncClient has no `jobs` and
    # aio.Device no `command` decorator.
    assert _public(sync_cls) - _public(async_cls) == set()


@PAIRS
def test_aio_methods_take_the_same_parameters(sync_cls: type, async_cls: type) -> None:
    for name in sorted(_public(sync_cls) & _public(async_cls)):
        sync_attr = inspect.getattr_static(sync_cls, name)
        async_attr = inspect.getattr_static(async_cls, name)
        if callable(sync_attr) and callable(async_attr):
            if isinstance(sync_attr, classmethod):
                sync_attr, async_attr = sync_attr.__func__, async_attr.__func__
            async_params = list(inspect.signature(async_attr).parameters)
            if "kwargs" in async_params:  # passed through as they are
                continue
            assert async_params == list(inspect.signature(sync_attr).parameters), f"{async_cls.__name__}.{name}"
