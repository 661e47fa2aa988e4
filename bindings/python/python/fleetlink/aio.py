"""fleetlink for asyncio: the API of ``fleetlink`` with coroutines and async iterators.

Each call runs the blocking native call in a worker thread (``asyncio.to_thread``); the native
side releases the GIL while it waits, so the event loop keeps running. Command handlers and
desired-state callbacks may be coroutine functions: they run on the event loop that registered
them.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

import fleetlink as _sync
from fleetlink import TimeLike
from fleetlink.errors import Timeout


async def connect(
    url: str, token: str, ca: str | Path | bytes | None = None, *, server_name: str = "localhost", timeout: float = 10.0
) -> "AsyncClient":
    """Connects an operator (see ``fleetlink.connect``)."""
    client = await asyncio.to_thread(_sync.connect, url, token, ca, server_name=server_name, timeout=timeout)
    return AsyncClient(client)


class AsyncSubscription:
    """A live stream as an async iterator of events (or ``pyarrow.RecordBatch``es when batched)."""

    def __init__(self, inner: _sync.Subscription) -> None:
        self._inner = inner

    async def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, None when the stream ended; ``Timeout`` after ``timeout`` seconds."""
        return await asyncio.to_thread(self._inner.next, timeout)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        it = iter(self._inner)
        done = object()
        while (item := await asyncio.to_thread(next, it, done)) is not done:
            yield item

    async def close(self) -> None:
        """Ends the stream."""
        await asyncio.to_thread(self._inner.close)

    async def __aenter__(self) -> "AsyncSubscription":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncCommandHandle:
    """``fleetlink.CommandHandle`` with coroutines."""

    def __init__(self, inner: _sync.CommandHandle) -> None:
        self._inner = inner
        self.id = inner.id

    @property
    def info(self) -> dict[str, Any]:
        """The command's last known record."""
        return self._inner.info

    async def status(self) -> str:
        """The command's state now."""
        return await asyncio.to_thread(self._inner.status)

    async def result(self, timeout: float = 10.0) -> Any:
        """The result, or ``CommandFailed`` / ``CommandTimeout``."""
        return await asyncio.to_thread(self._inner.result, timeout)

    async def cancel(self) -> dict[str, Any]:
        """Cancels the command."""
        return await asyncio.to_thread(self._inner.cancel)


class AsyncClient:
    """``fleetlink.Client`` with coroutines."""

    def __init__(self, inner: _sync.Client) -> None:
        self._inner = inner

    async def devices(self, query: str | None = None) -> list[dict[str, Any]]:
        """See ``Client.devices``."""
        return await asyncio.to_thread(self._inner.devices, query)

    async def query(self, query: str) -> list[dict[str, Any]]:
        """See ``Client.query``."""
        return await asyncio.to_thread(self._inner.query, query)

    async def fleet_table(self, query: str | None = None) -> pa.Table:
        """See ``Client.fleet_table``."""
        return await asyncio.to_thread(self._inner.fleet_table, query)

    async def telemetry(
        self,
        devices: Sequence[str] | str | None = None,
        metrics: Sequence[str] | str | None = None,
        start: TimeLike = None,
        end: TimeLike = None,
        every: Any = None,
        agg: str = "mean",
    ) -> pa.Table:
        """See ``Client.telemetry``."""
        return await asyncio.to_thread(self._inner.telemetry, devices, metrics, start, end, every, agg)

    async def provision(self, device_id: str, tags: Mapping[str, str] | None = None, attributes: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """See ``Client.provision``."""
        return await asyncio.to_thread(self._inner.provision, device_id, tags, attributes)

    async def provision_many(self, devices: Iterable[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """See ``Client.provision_many``."""
        devices = list(devices)
        return await asyncio.to_thread(self._inner.provision_many, devices)

    async def put_group(self, name: str, members: Sequence[str] = (), query: str | None = None) -> None:
        """See ``Client.put_group``."""
        await asyncio.to_thread(self._inner.put_group, name, members, query)

    async def twin(self, device: str) -> dict[str, Any]:
        """See ``Client.twin``."""
        return await asyncio.to_thread(self._inner.twin, device)

    async def set_desired(self, device: str, patch: Mapping[str, Any], version: int | None = None) -> dict[str, Any]:
        """See ``Client.set_desired``."""
        return await asyncio.to_thread(self._inner.set_desired, device, patch, version)

    async def command(self, device: str, name: str, args: Any = None, timeout: float = 10.0) -> Any:
        """See ``Client.command``."""
        return await asyncio.to_thread(self._inner.command, device, name, args, timeout)

    async def send_command(self, device: str, name: str, args: Any = None, **kwargs: Any) -> AsyncCommandHandle:
        """See ``Client.send_command``."""
        handle = await asyncio.to_thread(lambda: self._inner.send_command(device, name, args, **kwargs))
        return AsyncCommandHandle(handle)

    async def commands(self, device: str, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """See ``Client.commands``."""
        return await asyncio.to_thread(self._inner.commands, device, state, limit)

    async def subscribe(self, stream: str = "telemetry", query: str | None = None, metrics: Sequence[str] | None = None, job: int = 0, batch: bool = False, batch_rows: int = 10_000, batch_interval: float = 1.0) -> AsyncSubscription:
        """See ``Client.subscribe``."""
        sub = await asyncio.to_thread(self._inner.subscribe, stream, query, metrics, job, batch, batch_rows, batch_interval)
        return AsyncSubscription(sub)

    async def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> str:
        """See ``Client.publish``."""
        return await asyncio.to_thread(self._inner.publish, topic, payload, retain)

    async def create_job(self, query: str, **kwargs: Any) -> dict[str, Any]:
        """See ``Client.create_job``."""
        return await asyncio.to_thread(lambda: self._inner.create_job(query, **kwargs))

    async def job(self, job_id: int) -> dict[str, Any]:
        """See ``Client.job``."""
        return await asyncio.to_thread(self._inner.job, job_id)

    async def cancel_job(self, job_id: int) -> dict[str, Any]:
        """See ``Client.cancel_job``."""
        return await asyncio.to_thread(self._inner.cancel_job, job_id)

    @property
    def jobs(self) -> Awaitable[list[dict[str, Any]]]:
        """Every job, newest first (``await client.jobs``)."""
        return asyncio.to_thread(lambda: self._inner.jobs)

    async def close(self) -> None:
        """Closes the connection."""
        await asyncio.to_thread(self._inner.close)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a coroutine function so a fleetlink thread can call it: it runs on `loop`."""
    if not inspect.iscoroutinefunction(fn):
        return fn

    def call(*args: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(*args), loop).result()

    return call


class Device:
    """``fleetlink.Device`` with coroutines; handlers may be ``async def``."""

    def __init__(self, inner: _sync.Device, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop

    @classmethod
    async def connect(
        cls,
        url: str,
        device_id: str,
        token: str,
        ca: str | Path | bytes | None = None,
        *,
        server_name: str = "localhost",
        commands: Mapping[str, Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]] | None = None,
        timeout: float = 10.0,
        ack_coalescing: bool = True,
        telemetry_ack_delay: float | None = None,
        telemetry_ack_batches: int | None = None,
    ) -> "Device":
        """See ``fleetlink.Device.connect``; handlers may be coroutine functions."""
        loop = asyncio.get_running_loop()
        handlers = {name: _on_loop(loop, h) for name, h in (commands or {}).items()}
        inner = await asyncio.to_thread(
            lambda: _sync.Device.connect(
                url,
                device_id,
                token,
                ca,
                server_name=server_name,
                commands=handlers,
                timeout=timeout,
                ack_coalescing=ack_coalescing,
                telemetry_ack_delay=telemetry_ack_delay,
                telemetry_ack_batches=telemetry_ack_batches,
            )
        )
        return cls(inner, loop)

    @property
    def id(self) -> str:
        """The device's id."""
        return self._inner.id

    async def send(self, metrics: Mapping[str, Any], ts: TimeLike = None, timeout: float | None = None) -> None:
        """See ``fleetlink.Device.send``."""
        await asyncio.to_thread(self._inner.send, metrics, ts, timeout)

    async def flush(self, timeout: float = 10.0) -> None:
        """See ``fleetlink.Device.flush``."""
        await asyncio.to_thread(self._inner.flush, timeout)

    async def report(self, patch: Mapping[str, Any]) -> int:
        """See ``fleetlink.Device.report``."""
        return await asyncio.to_thread(self._inner.report, patch)

    def on_desired(self, callback: Callable[[dict[str, Any]], Any] | Callable[[dict[str, Any]], Awaitable[Any]]) -> None:
        """See ``fleetlink.Device.on_desired``; a coroutine function runs on this event loop."""
        self._inner.on_desired(_on_loop(self._loop, callback))

    def on_command(self, name: str, handler: Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]) -> None:
        """See ``fleetlink.Device.on_command``; a coroutine function runs on this event loop."""
        self._inner.on_command(name, _on_loop(self._loop, handler))

    def command(self, name: str) -> Callable[[Any], Any]:
        """Decorator form of ``on_command``."""

        def register(handler: Any) -> Any:
            self.on_command(name, handler)
            return handler

        return register

    async def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> int:
        """See ``fleetlink.Device.publish``."""
        return await asyncio.to_thread(self._inner.publish, topic, payload, retain)

    async def subscribe(self, topic: str) -> None:
        """See ``fleetlink.Device.subscribe``."""
        await asyncio.to_thread(self._inner.subscribe, topic)

    async def send_direct(self, to: str, payload: bytes | str, ttl: float | None = None) -> int:
        """See ``fleetlink.Device.send_direct``."""
        return await asyncio.to_thread(self._inner.send_direct, to, payload, ttl)

    async def next_message(self, timeout: float | None = None) -> dict[str, Any] | None:
        """See ``fleetlink.Device.next_message``."""
        return await asyncio.to_thread(self._inner.next_message, timeout)

    async def messages(self, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Bridge messages as they come; stops after ``timeout`` seconds without one."""
        while (m := await self.next_message(timeout)) is not None:
            yield m

    def stats(self) -> dict[str, Any]:
        """See ``fleetlink.Device.stats``."""
        return self._inner.stats()

    async def close(self) -> None:
        """See ``fleetlink.Device.close``."""
        await asyncio.to_thread(self._inner.close)

    async def __aenter__(self) -> "Device":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncClient", "AsyncCommandHandle", "AsyncSubscription", "Device", "Timeout", "connect"]
