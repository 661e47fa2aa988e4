"""The native half of fleetlink (Rust, pyo3). Use the public API in ``fleetlink`` instead; these
signatures are what it calls. Every blocking method releases the GIL and can be interrupted with
Ctrl-C. Errors are raised as the classes of ``fleetlink.errors``."""

from typing import Any, Callable

__version__: str

def init_logging(level: str = "info") -> None:
    """Sends fleetlink's Rust log events at ``level`` and above to Python ``logging``
    (loggers ``fleetlink.<crate>.<module>``)."""

class ArrowStream:
    """Record batches that Python takes once through the Arrow C stream interface."""

    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object:
        """A PyCapsule "arrow_array_stream"; the batches move into it (a second call raises)."""
    def __len__(self) -> int:
        """Rows in all, before the stream is consumed."""

class Subscription:
    """A live stream of events (dicts with an "event" key)."""

    def next(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next event; None when the stream ended; ``Timeout`` after ``timeout_s``."""
    def close(self) -> None:
        """Ends the stream."""

class Client:
    """A connected operator."""

    @staticmethod
    def connect(url: str, token: str, ca_pem: bytes, server_name: str = "localhost", timeout_s: float = 10.0) -> Client:
        """Connects and authenticates with an admin token."""
    def devices(self, query: str | None = None) -> list[dict[str, Any]]:
        """Devices (all, or those matching ``query``) as dicts."""
    def telemetry(
        self,
        devices: list[str] | None = None,
        metrics: list[str] | None = None,
        start_us: int | None = None,
        end_us: int | None = None,
        every_us: int | None = None,
        agg: str | None = None,
    ) -> ArrowStream:
        """Stored telemetry as Arrow (columns device, metric, time, value, text, lat, lon)."""
    def twin(self, device: str) -> dict[str, Any]:
        """The device's twin."""
    def set_desired(self, device: str, patch_json: str, version: int | None = None) -> dict[str, Any]:
        """Merges a JSON patch into the desired document; returns the twin."""
    def send_command(
        self,
        device: str,
        name: str,
        args_json: str,
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
        concurrent: bool = False,
        wait_s: float | None = None,
    ) -> dict[str, Any]:
        """Queues a command; returns its record once stored, or with ``wait_s`` once it finished or
        ``wait_s`` passed (one request)."""
    def get_command(self, id: int) -> dict[str, Any]:
        """One command's record."""
    def wait_command(self, id: int, timeout_s: float) -> dict[str, Any]:
        """Waits for a command to finish (at most ``timeout_s``); returns its record either way."""
    def cancel_command(self, id: int) -> dict[str, Any]:
        """Cancels an unfinished command."""
    def list_commands(self, device: str, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """A device's commands, newest first."""
    def provision(self, device_id: str, tags: dict[str, str], attributes_json: str) -> str:
        """Creates a device; returns its token."""
    def provision_many(self, devices: list[tuple[str, dict[str, str], str]]) -> list[str]:
        """Creates up to 1000 devices in one transaction; returns their tokens in order."""
    def subscribe(self, stream: str, query: str = "", metrics: list[str] = ..., job_id: int = 0) -> Subscription:
        """Opens a live stream."""
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> str:
        """Publishes to a topic as an operator."""
    def create_job(
        self,
        query: str,
        name: str,
        command: str | None = None,
        args_json: str = "null",
        timeout_s: float | None = None,
        desired_json: str | None = None,
        max_in_flight: int = 0,
        max_per_minute: int = 0,
        abort_failure_ratio: float = 0.0,
        abort_min_finished: int = 0,
    ) -> dict[str, Any]:
        """Creates a job; returns its progress."""
    def job(self, id: int) -> dict[str, Any]:
        """A job's progress."""
    def cancel_job(self, id: int) -> dict[str, Any]:
        """Cancels a running job."""
    def jobs(self) -> list[dict[str, Any]]:
        """Jobs, newest first."""
    def put_group(self, name: str, members: list[str] = ..., query: str | None = None) -> None:
        """Creates or replaces a group."""
    def close(self) -> None:
        """Closes the connection."""

class Device:
    """A connected device."""

    @staticmethod
    def connect(
        url: str,
        device_id: str,
        token: str,
        ca_pem: bytes,
        server_name: str = "localhost",
        commands: dict[str, Callable[[Any], Any]] | None = None,
        timeout_s: float = 10.0,
        ack_coalescing: bool = True,
        telemetry_ack_delay_s: float | None = None,
        telemetry_ack_batches: int | None = None,
    ) -> Device:
        """Connects and authenticates a device."""
    @property
    def id(self) -> str:
        """The device's id."""
    def send(self, metrics: dict[str, Any], ts_us: int, timeout_s: float | None = None) -> None:
        """Queues one point per metric at ``ts_us``."""
    def flush(self, timeout_s: float) -> None:
        """Waits until the server acknowledged everything sent."""
    def report(self, patch_json: str) -> int:
        """Merges a JSON patch into the reported twin; returns its version."""
    def on_desired(self, callback: Callable[[dict[str, Any]], object]) -> None:
        """Calls ``callback(state)`` now and after every change of the desired twin."""
    def on_command(self, name: str, handler: Callable[[Any], Any]) -> None:
        """Registers the handler of a command."""
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publishes to a topic; returns how many subscribers got it."""
    def subscribe(self, filter: str) -> None:
        """Subscribes to a topic filter."""
    def send_direct(self, to: str, payload: bytes, ttl_s: float | None = None) -> int:
        """Sends a direct message; returns its id."""
    def next_message(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next bridge message, or None after ``timeout_s``."""
    def stats(self) -> dict[str, Any]:
        """The device's counters."""
    def close(self) -> None:
        """Closes the connection."""

class Server:
    """An embedded server."""

    def __new__(cls, data_dir: str, listen: str = "127.0.0.1:0") -> Server: ...
    @property
    def url(self) -> str:
        """``fleetlink://host:port``."""
    @property
    def admin_token(self) -> str:
        """The admin token."""
    @property
    def ca_cert(self) -> str:
        """Path of the development CA certificate."""
    @property
    def data_dir(self) -> str:
        """The data directory."""
    @property
    def running(self) -> bool:
        """Whether it still runs."""
    def shutdown(self) -> None:
        """Stops the server, waiting until everything is written."""
