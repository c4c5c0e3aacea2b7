"""SSH tunnels on the pooled connection (`GP_ENABLE_TUNNELING`), for clusters where only SSH reaches the hosts.

The kernel's ports and its control listener are forwarded to local ports of the gateway over `direct-tcpip`
channels, and the kernel's callback comes back over a remote forward of the same connection. No extra processes:
paramiko channels, and one thread per direction of each forwarded connection.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any

import paramiko

from .ssh import send_eof

# Each spliced connection costs two threads: anyone on a host can open connections to its forwarded ports, so
# at most this many callbacks are spliced at once per SSH connection (four times as many connections to a kernel's
# forwarded ports, which only local users reach); more are closed.
MAX_SPLICES = 32
PROHIBITED, CONNECT_FAILED = 1, 2  # SSH_OPEN_ADMINISTRATIVELY_PROHIBITED; SSH_OPEN_CONNECT_FAILED (nothing listens)

log = logging.getLogger(__name__)


class _QuietRefusals(logging.Filter):
    """paramiko logs every refused channel as an ERROR. A forward refused because its kernel has ended is expected
    (ZMQ clients reconnect every 100 ms until they are closed), so those lines go; other refusals stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith("open FAILED: Connection refused: Connect failed")


def _half_close(end: Any) -> None:
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        if isinstance(end, paramiko.Channel):
            send_eof(end)
        else:
            end.shutdown(socket.SHUT_WR)


def splice(sock: socket.socket, channel: paramiko.Channel, done: Callable[[], None] | None = None) -> None:
    """Join a local socket and an SSH channel both ways; an EOF one way is passed on as a half-close (a request
    sent and shut for writing still gets its reply), and both close once both ways are done (then `done()`)."""
    remaining = [2]
    lock = threading.Lock()

    def pump(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        _half_close(dst)
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            for end in (sock, channel):
                with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                    end.close()
            if done is not None:
                done()

    for src, dst in ((sock, channel), (channel, sock)):
        threading.Thread(target=pump, args=(src, dst), daemon=True, name="sg-tunnel").start()


class CallbackForwards:
    """Remote forwards that lead kernels' callbacks back to our callback server, per pooled connection.

    paramiko keeps one forwarding handler per connection, so ours routes by the host-side port the kernel dialled.
    """

    def __init__(self) -> None:
        self._routes: weakref.WeakKeyDictionary[paramiko.Transport, dict[int, int]] = weakref.WeakKeyDictionary()
        self._slots: weakref.WeakKeyDictionary[paramiko.Transport, threading.BoundedSemaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def port(self, transport: paramiko.Transport, local_port: int) -> int:
        """The port on the host's 127.0.0.1 that leads back to our callback server at `local_port`. Blocking."""
        with self._lock:
            routes = self._routes.setdefault(transport, {})
            for remote, local in routes.items():
                if local == local_port:
                    return remote
            remote = transport.request_port_forward("127.0.0.1", 0, handler=self._arrived_on(transport))
            routes[remote] = local_port
            return remote

    def _arrived_on(self, transport: paramiko.Transport) -> Any:
        slots = self._slots.setdefault(transport, threading.BoundedSemaphore(MAX_SPLICES))

        def arrived(channel: paramiko.Channel, origin: Any, server: Any) -> None:
            target = self._routes.get(transport, {}).get(server[1])
            if not slots.acquire(blocking=False):
                channel.close()
                return
            try:
                if target is None:
                    raise OSError(f"no callback route for port {server[1]}")
                splice(socket.create_connection(("127.0.0.1", target), timeout=10), channel, slots.release)
            except OSError:
                slots.release()
                channel.close()

        return arrived


class Tunnels:
    """Local ports forwarded to ports on the host's loopback, for one kernel."""

    def __init__(self, transport: paramiko.Transport) -> None:
        self.transport = transport
        if not any(isinstance(f, _QuietRefusals) for f in transport.logger.filters):
            transport.logger.addFilter(_QuietRefusals())
        self._listeners: list[socket.socket] = []
        self._warned: set[int] = set()
        self._slots = threading.BoundedSemaphore(4 * MAX_SPLICES)  # loopback only: the gateway machine's users

    def forward(self, remote_port: int) -> int:
        """A local port whose connections reach the host's 127.0.0.1:`remote_port`."""
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(32)
        self._listeners.append(server)
        threading.Thread(target=self._serve, args=(server, remote_port), daemon=True, name="sg-tunnel").start()
        return server.getsockname()[1]

    def _serve(self, server: socket.socket, remote_port: int) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            try:
                channel = self.transport.open_channel(
                    "direct-tcpip", ("127.0.0.1", remote_port), conn.getpeername(), timeout=10
                )
            except (paramiko.SSHException, EOFError, OSError) as exc:
                self._slots.release()
                conn.close()
                self._refused(remote_port, exc)
                continue
            splice(conn, channel, self._slots.release)

    def _refused(self, remote_port: int, exc: Exception) -> None:
        """Say once per port why a forward failed, unless its kernel has simply ended. paramiko hands a refusal's
        reason to whichever thread asks first, so concurrent failed opens (every tunnel of a kernel that just
        ended) leave the others a bare "Unable to open channel.": those are not worth a warning either."""
        code = getattr(exc, "code", None)
        if (
            code == CONNECT_FAILED
            or (code is None and str(exc) == "Unable to open channel.")
            or remote_port in self._warned
        ):
            return
        self._warned.add(remote_port)
        hint = " (the host's sshd forbids it: sshd_config AllowTcpForwarding)" if code == PROHIBITED else ""
        log.warning("cannot forward to port %d of the host: %s%s", remote_port, exc, hint)

    def close(self) -> None:
        for server in self._listeners:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            server.close()
        self._listeners.clear()
