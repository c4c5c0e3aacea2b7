"""What /proc says about a kernel process: alive, its threads, the ports it listens on."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import socket
import sys
import time
from collections.abc import Callable

log = logging.getLogger("server_listener")


def thread_names(pid: int) -> set[str]:
    """The names of PID's threads as the kernel keeps them (at most 15 bytes: longer names are cut)."""
    names = set()
    for comm in glob.glob(f"/proc/{pid}/task/*/comm"):
        with contextlib.suppress(OSError), open(comm, encoding="utf-8", errors="replace") as f:
            names.add(f.read().rstrip("\n"))
    return names


def has_thread(pid: int, name: str) -> bool:
    """Whether PID runs a thread called `name` (compared as the kernel keeps it: its first 15 bytes)."""
    return name.encode()[:15].decode(errors="ignore") in thread_names(pid)


def thread_guard(pid: int, thread: str, reason: str) -> Callable[[], str | None]:
    """An interrupt guard: refuse with `reason` while PID has no thread named `thread`."""
    return lambda: None if has_thread(pid, thread) else reason


def listening_sockets() -> list[tuple[str, int, str]]:
    """(address, port, socket inode) of TCP sockets in state LISTEN on this host, from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                    address, port = fields[1].rsplit(":", 1)
                    found.append((_proc_address(address), int(port, 16), fields[9]))
    return found


def _proc_address(hex_address: str) -> str:
    """An address as /proc/net/tcp* prints it (32-bit words in host order) -> text; wildcards -> loopback."""
    raw = b"".join(int(hex_address[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_address), 8))
    if len(raw) == 16 and raw[:12] == bytes(10) + b"\xff\xff":  # an IPv4-mapped IPv6 address
        raw = raw[12:]
    if not any(raw):
        return "127.0.0.1"
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def listening_ports() -> set[int]:
    """Local TCP ports in state LISTEN on this host (any address)."""
    return {port for _, port, _ in listening_sockets()}


def process_listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets PID listens on (its own: matched by socket inode)."""
    inodes = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(target[8:-1])
    return [(address, port) for address, port, inode in listening_sockets() if inode in inodes]


def wait_for_kernel_ports(pid: int, ports: list[int], interval: float = 0.1) -> None:
    """Return once every port in ``ports`` is listening; raise if ``pid`` exits first. For kernels that bind the
    connection file's ports themselves after the listener wrote it (Toree's JVM): the callback then tells the
    gateway about a kernel clients can connect to at once."""
    while not set(ports) <= listening_ports():
        if not pid_alive(pid):
            raise RuntimeError(f"process {pid} exited before its kernel listened on the connection file's ports")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (reaps it if it is our child)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another account's process: it exists; /proc says whether it is a zombie
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True  # no procfs: trust kill(0)
