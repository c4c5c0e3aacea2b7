"""Gateway-side client of the launcher's authenticated control listener (protocol v1, docs/design.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from .protocol import MAX_MESSAGE, request_mac


class ControlError(Exception):
    """A control request failed; the message names host:port and the reason."""


class ControlFailed(ControlError):
    """The listener answered the request and it failed (``"ok": false``): it must not be retried another way."""


class ControlRefused(ControlFailed):
    """The listener understood the request and declined it on purpose (``"refused": true``); the reason says why."""


async def _read_json_line(reader: asyncio.StreamReader, what: str) -> dict[str, Any]:
    line = await reader.readline()
    if not line.endswith(b"\n"):
        raise ControlError(f"connection closed before the {what} (bad MAC or unknown op?)")
    try:
        message = json.loads(line)
    except ValueError:
        raise ControlError(f"{what} is not JSON: {line[:200]!r}") from None
    if not isinstance(message, dict):
        raise ControlError(f"{what} is not a JSON object")
    return message


class _Connection:
    """One open connection to a listener and the challenge its next request must answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, challenge: str) -> None:
        self.reader, self.writer, self.challenge = reader, writer, challenge
        self.loop, self.used = asyncio.get_running_loop(), time.monotonic()

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=MAX_MESSAGE)
        try:
            challenge = (await _read_json_line(reader, "challenge")).get("challenge")
        except BaseException:
            writer.close()
            raise
        if not isinstance(challenge, str):
            writer.close()
            raise ControlError("malformed challenge")
        return cls(reader, writer, challenge)

    async def exchange(self, secret: bytes, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Send the signed request and read its reply; the reply's `challenge` (if any) is kept for the next one."""
        request = {"op": op, "args": args, "mac": request_mac(secret, self.challenge, op, args)}
        self.challenge = ""
        self.writer.write(json.dumps(request).encode() + b"\n")
        await self.writer.drain()
        reply = await _read_json_line(self.reader, "reply")
        challenge = reply.pop("challenge", None)
        self.challenge, self.used = (challenge if isinstance(challenge, str) else ""), time.monotonic()
        return reply

    def reusable(self) -> bool:
        """The listener offered another request, recently enough, on this event loop."""
        fresh = time.monotonic() - self.used < KEEP_IDLE
        return bool(self.challenge) and fresh and self.loop is asyncio.get_running_loop() and self._open()

    def _open(self) -> bool:
        return not self.reader.at_eof() and self.reader.exception() is None and not self.writer.is_closing()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # its event loop is already closed
            self.writer.close()


# A kept connection is reused only while it was used this recently: the listener drops idle ones after
# sg_control.KEEP_IDLE (60 s), so a reused connection is never one it is closing; above POLL_LEASE (30 s), so the
# real polls keep reusing it.
KEEP_IDLE = 45.0
POLL_LEASE = 30.0  # the longest a kept connection vouches for its kernel between real requests


def poll_lease(unreachable_grace: float, orphan_timeout: float) -> float:
    """How long a kept connection may vouch for its kernel: a real request goes at least every POLL_LEASE
    seconds, every `unreachable_grace` (a silent host is reported lost within twice the grace), and three times
    per `orphan_timeout` (the listener must see polls; 0 = none)."""
    lease = min(POLL_LEASE, unreachable_grace)
    return min(lease, orphan_timeout / 3) if orphan_timeout > 0 else lease


def _checked(where: str, op: str, reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok") is not True and reply.get("refused") is True:
        raise ControlRefused(str(reply.get("error", "refused")))
    if reply.get("ok") is not True:
        raise ControlFailed(f"{where}, op {op!r} failed: {reply.get('error', reply)}")
    return reply


async def _bounded(where: str, op: str, timeout: float, exchange: Any) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(exchange, timeout)
    except ControlError as exc:
        raise ControlError(f"{where}, op {op!r}: {exc}") from None
    except asyncio.TimeoutError:
        raise ControlError(f"{where}, op {op!r}: no answer within {timeout} s") from None
    except (OSError, ValueError) as exc:
        raise ControlError(f"{where}, op {op!r}: {exc!r}") from exc


async def _one_shot(host: str, port: int, secret: bytes, op: str, args: dict[str, Any]) -> dict[str, Any]:
    connection = await _Connection.open(host, port)
    try:
        return await connection.exchange(secret, op, args)
    finally:
        connection.close()


async def control_request(
    host: str,
    port: int,
    secret_hex: str,
    op: str,
    args: dict[str, Any] | None = None,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """Send one authenticated request on a connection of its own; return the reply (``ok`` is true) or raise
    ControlError."""
    where = f"control listener {host}:{port}"
    try:
        secret = bytes.fromhex(secret_hex)
    except ValueError as exc:
        raise ControlError(f"{where}, op {op!r}: {exc!r}") from exc
    return _checked(where, op, await _bounded(where, op, timeout, _one_shot(host, port, secret, op, args or {})))


class ControlChannel:
    """A kernel's control listener, talked to over one connection kept open between requests.

    Polls every few seconds for every kernel are the gateway's steady cost: a kept connection makes each one a
    single signed line and its reply, instead of a TCP (or, tunnelled, an SSH channel) set-up, a challenge and a
    tear-down. Each reply carries a fresh challenge for the next request, so a request is never replayable. A
    request that finds the connection busy (an `info` waiting for news) uses a connection of its own; a kept
    connection that fails is replaced once.
    """

    def __init__(self, host: str, port: int, secret_hex: str) -> None:
        self.address = (host, port, secret_hex)
        self._secret = bytes.fromhex(secret_hex)
        self._connection: _Connection | None = None
        self._busy = False

    async def request(self, op: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """Send one authenticated request; return the reply (``ok`` is true) or raise ControlError."""
        host, port, _ = self.address
        where = f"control listener {host}:{port}"
        if self._busy:
            shot = _one_shot(host, port, self._secret, op, args or {})
            return _checked(where, op, await _bounded(where, op, timeout, shot))
        self._busy = True
        try:
            return _checked(where, op, await _bounded(where, op, timeout, self._exchange(op, args or {})))
        finally:
            self._busy = False

    async def _exchange(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        kept, self._connection = self._connection, None
        if kept is not None and kept.reusable():
            try:
                return self._keep(kept, await kept.exchange(self._secret, op, args))
            except (ControlError, OSError):  # closed by the listener (restarted, evicted): once more, afresh
                kept.close()
            except BaseException:
                kept.close()
                raise
        elif kept is not None:
            kept.close()
        connection = await _Connection.open(*self.address[:2])
        try:
            return self._keep(connection, await connection.exchange(self._secret, op, args))
        except BaseException:
            connection.close()
            raise

    def _keep(self, connection: _Connection, reply: dict[str, Any]) -> dict[str, Any]:
        if connection.challenge:
            self._connection = connection
        else:  # the listener did not offer another request (e.g. after `shutdown`)
            connection.close()
        return reply

    async def until_bound(self, deadline: float, wait: float) -> bool:
        """Ask (op `ready`, each answer within `wait` s) until the kernel's sockets are bound; False at `deadline`."""
        while not (await self.request("ready", {"wait": wait}, timeout=wait + 2))["ready"]:
            if time.monotonic() > deadline:
                return False
        return True

    async def vouched(self, lease: float) -> bool:
        """`vouches`, once the event loop has turned twice: a close that already arrived is read first (its event
        runs after the ready queue), and a tight poll loop yields."""
        if not self.vouches(lease):
            return False
        for _ in range(2):
            await asyncio.sleep(0)
        return self.vouches(lease)

    def vouches(self, lease: float) -> bool:
        """True while the kept connection is open and answered within `lease` seconds.

        The listener holding it ends with the kernel (the Python launcher is the kernel's own process; the R and
        Scala listeners exit when their kernel does), and its end closes the connection, which this event loop
        sees at once: so an open, recently answered connection is proof of life without a round trip. A host
        that falls silent closes nothing: the lease bounds how long that goes unnoticed.
        """
        kept = self._connection
        return kept is not None and not self._busy and kept.reusable() and time.monotonic() - kept.used < lease

    def close(self) -> None:
        """Close the kept connection, if any."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
