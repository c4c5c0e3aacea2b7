"""The wire protocol between the gateway and a kernel's launcher, v1 (docs/design.md): defined here, once.

Standard library only: `kernel-launchers/shared/scripts/sg_protocol.py` is a link to this file, so every kernelspec
carries it beside the launchers and both sides import it: the version, the AAD, the port names, the limits, the
signed form of a control request and the address syntax cannot drift apart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import time
from typing import Any

VERSION = 1
AAD_PREFIX = b"spark_gateway/v1|"  # AES-GCM associated data of a callback: this prefix + the kernel id
MAX_MESSAGE = 64 * 1024  # a callback envelope, or one control line, at most
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
CONTROL_OPS = ("poll", "signal", "shutdown", "info", "ready")
INFO_MAX_WAIT = 4.0  # seconds an `info` or `ready` request may wait (below the client's 5 s timeout)

# The callback envelope, and the plaintext it seals: field -> JSON type(s).
ENVELOPE_FIELDS = ("v", "kernel_id", "key", "nonce", "data", "tag")
NONCE_BYTES, TAG_BYTES, AES_KEY_BYTES = 12, 16, 32
PLAINTEXT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "kernel_id": str,
    "launch_token": str,
    "connection_info": dict,
    "pid": int,
    "pgid": int,
    "hostname": str,
    "listener_port": int,
    "listener_secret": str,
    "connection_file": str,
    "log_file": (str, type(None)),
}
CONNECTION_FIELDS: dict[str, type] = {
    **dict.fromkeys(PORT_NAMES, int),
    "ip": str,
    "key": str,
    "transport": str,
    "signature_scheme": str,
}


def aad(kernel_id: str) -> bytes:
    """The associated data that binds a callback's ciphertext to its kernel id."""
    return AAD_PREFIX + kernel_id.encode()


def canonical_request(op: str, args: dict[str, Any]) -> str:
    """The signed form of a control request."""
    return json.dumps({"op": op, "args": args}, sort_keys=True, separators=(",", ":"))


def request_mac(secret: bytes, challenge: str, op: str, args: dict[str, Any]) -> str:
    """hex HMAC-SHA256(secret, challenge + "\\n" + canonical request); the key is the secret's raw bytes."""
    message = f"{challenge}\n{canonical_request(op, args)}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def parse_address(address: str) -> tuple[str, int]:
    """Split `host:port` (an IPv6 host in brackets: `[::1]:8877`)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"invalid address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def recv_line(sock: socket.socket, deadline: float, limit: int = MAX_MESSAGE) -> bytes:
    """Read one `\\n`-terminated line (or up to EOF) before `deadline` (monotonic); at most `limit` bytes."""
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise ValueError(f"line longer than {limit} bytes")
    return buf.split(b"\n", 1)[0]
