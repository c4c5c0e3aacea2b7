"""Kernel ports and the connection file: ports reserved within the port range, held bound until used."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import secrets
import socket
from typing import Any

import sg_protocol as protocol

log = logging.getLogger("server_listener")


def parse_port_range(port_range: str) -> tuple[int, int]:
    """Parse ``lower..upper``; ``0..0`` means any port."""
    try:
        lower, upper = (int(part) for part in port_range.split(".."))
    except ValueError:
        raise ValueError(f"invalid port range {port_range!r}: expected 'lower..upper'") from None
    if (lower, upper) != (0, 0) and not 0 < lower <= upper <= 65535:
        raise ValueError(f"invalid port range {port_range!r}: need 0 < lower <= upper <= 65535")
    return lower, upper


def _socket_for(ip: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)


def _ephemeral_low() -> int:
    """First port of the range the OS hands out to outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class PortReservation:
    """Free ports held bound (not listening) until released one by one right before use, so that neither another
    kernel starting on the host nor an outgoing connection of ours can take one in between.

    Random within the port range; for ``0..0``, random below the OS's ephemeral range (outgoing connections never
    use those), falling back to OS-assigned ports when that range is too small.
    """

    def __init__(self, port_range: str, count: int, ip: str = "0.0.0.0") -> None:
        lower, upper = parse_port_range(port_range)
        if upper == 0:
            lower, upper = 10000, _ephemeral_low() - 1
        if upper - lower + 1 >= 4 * count:
            candidates = random.sample(range(lower, upper + 1), upper - lower + 1)
        elif parse_port_range(port_range)[1] == 0:
            candidates = [0] * count
        else:
            candidates = random.sample(range(lower, upper + 1), upper - lower + 1)
        self._held: dict[int, socket.socket] = {}
        for port in candidates:
            sock = _socket_for(ip)
            try:
                sock.bind((ip, port))
            except OSError:
                sock.close()
                continue
            self._held[sock.getsockname()[1]] = sock
            if len(self._held) == count:
                self.ports = list(self._held)
                return
        self.release()
        raise OSError(errno.EADDRINUSE, f"fewer than {count} free ports in range {port_range} on {ip}")

    def release(self, *ports: int) -> None:
        """Free `ports` (all, when none are named) for their real owner to bind."""
        for port in ports or list(self._held):
            sock = self._held.pop(port, None)
            if sock is not None:
                sock.close()


def select_ports(port_range: str, count: int, ip: str = "0.0.0.0") -> list[int]:
    """``count`` distinct free TCP ports on ``ip``, released at once (see PortReservation to hold them)."""
    reservation = PortReservation(port_range, count, ip)
    reservation.release()
    return reservation.ports


def build_connection_info(ports: list[int], ip: str = "0.0.0.0", kernel_name: str = "") -> dict[str, Any]:
    """Jupyter connection info for five kernel ports (shell, iopub, stdin, control, hb), fresh HMAC key."""
    if len(ports) != len(protocol.PORT_NAMES):
        raise ValueError(f"need {len(protocol.PORT_NAMES)} ports, got {len(ports)}")
    return {
        **dict(zip(protocol.PORT_NAMES, ports, strict=True)),
        "ip": ip,
        "key": secrets.token_hex(32),
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "kernel_name": kernel_name,
    }


def write_connection_file(path: str, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON to ``path``, readable by the owner only (0600).

    The file appears complete (written beside it, then renamed), so a launcher polling for it never reads half of it.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        remove_file(tmp)
        raise


def remove_file(path: str) -> None:
    """Remove ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
