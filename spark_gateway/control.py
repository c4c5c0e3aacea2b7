"""Gateway-side client of the launcher's authenticated control listener (protocol v1, docs/design.md)."""

from __future__ import annotations

import asyncio
import json
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


async def _exchange(host: str, port: int, secret: bytes, op: str, args: dict[str, Any]) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection(host, port, limit=MAX_MESSAGE)
    try:
        challenge = (await _read_json_line(reader, "challenge")).get("challenge")
        if not isinstance(challenge, str):
            raise ControlError("malformed challenge")
        request = {"op": op, "args": args, "mac": request_mac(secret, challenge, op, args)}
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        return await _read_json_line(reader, "reply")
    finally:
        writer.close()


async def control_request(
    host: str,
    port: int,
    secret_hex: str,
    op: str,
    args: dict[str, Any] | None = None,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """Send one authenticated request; return the reply (``ok`` is true) or raise ControlError."""
    where = f"control listener {host}:{port}"
    try:
        secret = bytes.fromhex(secret_hex)
        reply = await asyncio.wait_for(_exchange(host, port, secret, op, args or {}), timeout)
    except ControlError as exc:
        raise ControlError(f"{where}, op {op!r}: {exc}") from None
    except asyncio.TimeoutError:
        raise ControlError(f"{where}, op {op!r}: no answer within {timeout} s") from None
    except (OSError, ValueError) as exc:
        raise ControlError(f"{where}, op {op!r}: {exc!r}") from exc
    if reply.get("ok") is not True and reply.get("refused") is True:
        raise ControlRefused(str(reply.get("error", "refused")))
    if reply.get("ok") is not True:
        raise ControlFailed(f"{where}, op {op!r} failed: {reply.get('error', reply)}")
    return reply
