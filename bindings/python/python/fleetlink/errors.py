"""Exceptions raised by fleetlink. Every error from the native module is converted in one place
(``bindings/python/src/errors.rs``) into one of these."""

from __future__ import annotations


class FleetlinkError(Exception):
    """Base class of every fleetlink error."""


class AuthError(FleetlinkError):
    """Wrong or missing credentials (admin token, device token)."""


class NotFound(FleetlinkError, KeyError):
    """The device, command, job or group does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; a message reads better plain
        return str(self.args[0]) if self.args else ""


class Conflict(FleetlinkError):
    """A version check failed (stale twin version) or the object is already finished."""


class PermissionDenied(FleetlinkError):
    """The bridge policy refuses the action."""


class InvalidArgument(FleetlinkError, ValueError):
    """An argument is invalid; the message says which and why."""


class ConnectionLost(FleetlinkError):
    """The connection to the server was lost, refused or closed."""


class Timeout(FleetlinkError, TimeoutError):
    """A wait ran out of time."""


class CommandFailed(FleetlinkError):
    """A command ended failed, rejected, expired or cancelled.

    Attributes: ``command_id``, ``state`` and ``error`` (the device's message)."""

    command_id: int | None = None
    state: str | None = None
    error: str | None = None


class CommandTimeout(Timeout):
    """A command was still running when the wait ended; it goes on (``command_id`` says which)."""

    command_id: int | None = None


__all__ = [
    "AuthError",
    "CommandFailed",
    "CommandTimeout",
    "Conflict",
    "ConnectionLost",
    "FleetlinkError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Timeout",
]
