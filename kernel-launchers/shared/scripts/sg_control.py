"""The authenticated control listener (protocol v1, docs/design.md): poll, signal, shutdown, info."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import sg_protocol as protocol
from sg_ports import _socket_for
from sg_procinfo import pid_alive

log = logging.getLogger("server_listener")

MAX_MESSAGE = protocol.MAX_MESSAGE
INFO_MAX_WAIT = protocol.INFO_MAX_WAIT
SHUTDOWN_GRACE = 1.0
KEEP_IDLE = 60.0  # seconds a kept (authenticated) connection may wait for its next request
ORPHAN_TIMEOUT_DEFAULT = 1800.0  # seconds without an authenticated request before the kernel ends itself


class _Ignored(Exception):
    """A control request that is logged and dropped without a reply."""


class OrphanWatch:
    """Ends the kernel when no authenticated control request came for `timeout` seconds (0: never).

    The gateway polls every kernel it manages every few seconds; a kernel nobody polls any more lost its gateway
    (crashed, not restored) and would otherwise hold its host and its Spark application forever. Decided here, on
    the kernel's host, so it works when the gateway's host is gone.
    """

    def __init__(self, timeout: float, end: Callable[[], None]) -> None:
        self.timeout, self._end = timeout, end
        self.last = time.monotonic()

    @staticmethod
    def timeout_from_env() -> float:
        value = os.environ.get("GP_ORPHAN_TIMEOUT", "")
        try:
            return max(0.0, float(value)) if value.strip() else ORPHAN_TIMEOUT_DEFAULT
        except ValueError:
            log.warning("GP_ORPHAN_TIMEOUT=%r is not a number of seconds; using %g", value, ORPHAN_TIMEOUT_DEFAULT)
            return ORPHAN_TIMEOUT_DEFAULT

    def seen(self) -> None:
        self.last = time.monotonic()

    def start(self) -> None:
        if self.timeout > 0:
            threading.Thread(target=self._watch, name="orphan-watch", daemon=True).start()

    def _watch(self) -> None:
        while (idle := time.monotonic() - self.last) < self.timeout:
            time.sleep(min(self.timeout - idle, 5.0) + 0.01)
        log.warning("no request from the gateway for %.0f s (GP_ORPHAN_TIMEOUT): the kernel shuts down", idle)
        self._end()


class ControlListener:
    """Authenticated control listener (poll / signal / shutdown / info / ready) for one kernel process.

    ``info(wait)`` (optional) returns the launcher's report for the `info` op, e.g. ``{"spark": {...}}``; it may
    wait up to ``wait`` seconds for a change (such as a SparkSession that is still starting). ``ready(wait)``
    (optional) waits up to ``wait`` seconds for the kernel's sockets to be bound and says whether they are; without
    it the kernel is ready whenever the listener answers.
    """

    def __init__(
        self,
        pid: int,
        pgid: int,
        port: int = 0,
        ip: str = "0.0.0.0",
        secret: bytes | None = None,
        timeout: float = 5.0,
        max_connections: int = 16,
        info: Callable[[float], dict[str, Any]] | None = None,
        ready: Callable[[float], bool] | None = None,
        first_line_timeout: float = 5.0,
        max_per_peer: int = 4,
        max_kept: int = 4,
        interrupt_signal: int | None = None,
        interrupt_guard: Callable[[], str | None] | None = None,
        orphan_timeout: float | None = None,
    ) -> None:
        self.pid, self.pgid, self.timeout, self.info, self.ready = pid, pgid, timeout, info, ready
        # None: GP_ORPHAN_TIMEOUT from the environment the gateway exported (default 1800 s)
        self.orphans = OrphanWatch(
            OrphanWatch.timeout_from_env() if orphan_timeout is None else orphan_timeout, self._terminate_group
        )
        # SIGINT to the pid is sent as this signal instead: for kernels that cannot handle SIGINT (a JVM started in
        # the background inherits SIGINT ignored, and cannot handle it then; Toree takes --alternate-sigint USR2)
        self.interrupt_signal = interrupt_signal
        # Returns why an interrupt must not be sent now (None: send it); the reply is then refused with that reason
        self.interrupt_guard = interrupt_guard
        self.secret = secret or secrets.token_bytes(32)
        # Anyone on the network can connect: a request line must come within first_line_timeout, and when all
        # max_connections (or a peer's max_per_peer) are taken, a newcomer evicts the oldest connection still
        # waiting for its request line, so silent connections can never keep the gateway's request out.
        self.first_line_timeout = min(first_line_timeout, timeout)
        self.max_connections, self.max_per_peer = max_connections, max_per_peer
        # After an authenticated request, up to max_kept connections stay open for the next one (the gateway's
        # polls); their reply carries the next challenge. They hold their slot: no newcomer evicts them.
        self.max_kept = max_kept
        self._lock = threading.Lock()
        self._active = self._kept = 0
        self._waiting: list[tuple[str, socket.socket]] = []  # (peer address, connection), oldest first
        self._sock = _socket_for(ip)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((ip, port))
        self._sock.listen(16)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="control-listener", daemon=True)

    @property
    def secret_hex(self) -> str:
        return self.secret.hex()

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread.start()
        self.orphans.start()

    def stop(self) -> None:
        """Close the listening socket; the serving thread ends."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return  # socket closed by stop()
            if not self._admit(conn, str(peer[0]) if peer else "?"):
                log.warning("control connection from %s dropped: too many connections", peer)
                conn.close()
                continue
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _admit(self, conn: socket.socket, address: str) -> bool:
        """Take a slot for `conn`, evicting the oldest silent connection (of its peer first) when full."""
        with self._lock:
            same = [w for w in self._waiting if w[0] == address]
            victim = same[0] if len(same) >= self.max_per_peer else None
            if victim is None and self._active >= self.max_connections:
                victim = self._waiting[0] if self._waiting else None
                if victim is None:
                    return False
            if victim is not None:
                self._waiting.remove(victim)
                with contextlib.suppress(OSError):
                    victim[1].shutdown(socket.SHUT_RDWR)  # its thread wakes, fails its read and frees its slot
            self._active += 1
            self._waiting.append((address, conn))
            return True

    def _heard(self, conn: socket.socket) -> None:
        with self._lock:
            self._waiting = [w for w in self._waiting if w[1] is not conn]

    def _handle(self, conn: socket.socket, peer: Any) -> None:
        after: Callable[[], None] | None = None
        kept = False
        try:
            with conn:
                challenge = secrets.token_hex(16)
                conn.settimeout(self.timeout)
                conn.sendall(json.dumps({"challenge": challenge}).encode() + b"\n")
                line = protocol.recv_line(conn, time.monotonic() + self.first_line_timeout, MAX_MESSAGE)
                self._heard(conn)
                while True:
                    op, args = self._authenticate(challenge, line)
                    self.orphans.seen()
                    reply, after = self._dispatch(op, args)
                    kept = kept or (after is None and self._keep())
                    challenge = secrets.token_hex(16) if kept and after is None else ""
                    conn.sendall(json.dumps({**reply, "challenge": challenge} if challenge else reply).encode() + b"\n")
                    if not challenge:
                        break
                    try:
                        line = protocol.recv_line(conn, time.monotonic() + KEEP_IDLE, MAX_MESSAGE)
                    except (OSError, ValueError):
                        break  # idle too long, or gone
                    if not line:
                        break  # the client closed it
            if after:
                after()
        except _Ignored as exc:
            log.warning("control request from %s ignored: %s", peer, exc)
        except Exception as exc:  # never let a client take the thread down
            log.warning("control connection from %s failed: %r", peer, exc)
        finally:
            self._heard(conn)
            with self._lock:
                self._active -= 1
                self._kept -= kept

    def _keep(self) -> bool:
        """Take one of the max_kept places for an authenticated connection; False when all are taken."""
        with self._lock:
            if self._kept >= self.max_kept:
                return False
            self._kept += 1
            return True

    def _authenticate(self, challenge: str, line: bytes) -> tuple[str, dict[str, Any]]:
        try:
            request = json.loads(line)
        except ValueError:
            raise _Ignored("bad JSON") from None
        if not isinstance(request, dict):
            raise _Ignored("bad JSON: not an object")
        op, args, mac = request.get("op"), request.get("args", {}), request.get("mac")
        if not isinstance(op, str) or not isinstance(args, dict) or not isinstance(mac, str):
            raise _Ignored("bad request: need op (str), args (object), mac (str)")
        if not hmac.compare_digest(mac, protocol.request_mac(self.secret, challenge, op, args)):
            raise _Ignored(f"bad MAC for op {op!r}")
        if op not in protocol.CONTROL_OPS:
            raise _Ignored(f"unknown op {op!r}")
        return op, args

    def _dispatch(self, op: str, args: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], None] | None]:
        if op == "poll":
            return {"ok": True, "alive": pid_alive(self.pid)}, None
        if op in ("info", "ready"):
            wait = args.get("wait", 0)
            if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= INFO_MAX_WAIT:
                return {"ok": False, "error": f"bad {op} args {args!r}: wait is 0..{INFO_MAX_WAIT:g} seconds"}, None
            if op == "ready":
                return {"ok": True, "ready": self.ready(float(wait)) if self.ready else True}, None
            return {"ok": True, **(self.info(float(wait)) if self.info else {})}, None
        if op == "shutdown":
            log.info("control: shutdown of process group %d", self.pgid)
            return {"ok": True}, self._terminate_group
        signum, group = args.get("signum"), args.get("group", False)
        if not isinstance(signum, int) or signum not in signal.valid_signals() or not isinstance(group, bool):
            return {"ok": False, "error": f"bad signal args {args!r}"}, None
        if signum == signal.SIGINT and not group:
            if self.interrupt_guard and (reason := self.interrupt_guard()):
                log.warning("control: interrupt of pid %d refused: %s", self.pid, reason)
                return {"ok": False, "refused": True, "error": reason}, None
            signum = self.interrupt_signal or signum
        try:
            if group:
                os.killpg(self.pgid, signum)
            elif self.pid == os.getpid():  # our own process (the Python launcher): to the thread that runs the cells,
                # so its blocking call (e.g. py4j waiting for a Spark job) is interrupted; a signal to the process may
                # land on another thread, and the cell would then not see it until that call returns
                signal.pthread_kill(threading.main_thread().ident, signum)  # type: ignore[arg-type]
            else:
                os.kill(self.pid, signum)
        except OSError as exc:
            return {"ok": False, "error": f"signal {signum} failed: {exc}"}, None
        target = f"process group {self.pgid}" if group else f"pid {self.pid}"
        log.info("control: sent signal %d to %s", signum, target)
        return {"ok": True}, None

    def _terminate_group(self) -> None:
        """SIGTERM the group now, SIGKILL after the grace period (from a helper outside the group)."""
        killer = f"import os,time\ntime.sleep({SHUTDOWN_GRACE})\ntry: os.killpg({self.pgid}, 9)\nexcept OSError: pass"
        subprocess.Popen(
            [sys.executable, "-c", killer],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            os.killpg(self.pgid, signal.SIGTERM)
        except OSError as exc:
            log.warning("SIGTERM to process group %d failed: %s", self.pgid, exc)
