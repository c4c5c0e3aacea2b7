"""Remote side of the spark_gateway callback and control protocols (v1, see docs/design.md).

Self-contained (stdlib + pycryptodome) so it can be copied to cluster hosts. Importable by a launcher placed
in the same directory, or run standalone for launchers in other languages:

    server_listener.py --kernel-id ID --response-address H:P --public-key B64 --port-range R \
        --connection-file PATH --pid PID [--ip IP] [--info-file PATH] [--wait-for-ports] [--interrupt-signal SIG]
        [--interrupt-needs-thread NAME --interrupt-refusal TEXT] [--spark-report]
                                                                         (reads GP_LAUNCH_TOKEN from the environment)

Standalone, it terminates PID when it cannot do its job (no connection file, no callback): a kernel the gateway
cannot reach must not linger, and the launcher's exit makes the gateway fail the start at once with the log tail.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import glob
import hashlib
import hmac
import json
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

log = logging.getLogger("server_listener")

PROTOCOL_VERSION = 1
AAD_PREFIX = b"spark_gateway/v1|"
MAX_MESSAGE = 64 * 1024
KERNEL_PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
CONTROL_OPS = ("poll", "signal", "shutdown", "info")
INFO_MAX_WAIT = 4.0  # seconds an `info` request may wait for news (below the client's 5 s timeout)
SHUTDOWN_GRACE = 1.0


class CallbackError(RuntimeError):
    """The connection info could not be delivered to the gateway."""


class _Ignored(Exception):
    """A control request that is logged and dropped without a reply."""


# --- ports and connection file -------------------------------------------------------------------


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
    if len(ports) != len(KERNEL_PORT_NAMES):
        raise ValueError(f"need {len(KERNEL_PORT_NAMES)} ports, got {len(ports)}")
    return {
        **dict(zip(KERNEL_PORT_NAMES, ports, strict=True)),
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


# --- callback ------------------------------------------------------------------------------------


def payload_fields(
    kernel_id: str,
    connection_info: dict[str, Any],
    pid: int,
    pgid: int,
    listener: ControlListener,
    connection_file: str,
) -> dict[str, Any]:
    """The callback plaintext fields other than ``kernel_id`` and ``launch_token``."""
    log_dir = os.environ.get("GP_KERNEL_LOG_DIR")
    return {
        "connection_info": connection_info,
        "pid": pid,
        "pgid": pgid,
        "hostname": socket.gethostname(),
        "listener_port": listener.port,
        "listener_secret": listener.secret_hex,
        "connection_file": os.path.abspath(connection_file),
        "log_file": os.path.join(log_dir, f"kernel-{kernel_id}.log") if log_dir else None,
    }


def encrypt_payload(public_key_b64: str, kernel_id: str, plaintext: dict[str, Any]) -> bytes:
    """Seal ``plaintext`` into a v1 envelope: AES-256-GCM, key wrapped with RSA-OAEP-SHA256."""
    # Imported here: pycryptodome costs ~40 ms to import; CallbackSender pays it in a helper process.
    from Crypto.Cipher import AES, PKCS1_OAEP
    from Crypto.Hash import SHA256
    from Crypto.PublicKey import RSA

    rsa_key = RSA.import_key(base64.b64decode(public_key_b64))
    aes_key = secrets.token_bytes(32)
    nonce = secrets.token_bytes(12)
    cipher = AES.new(aes_key, AES.MODE_GCM, nonce=nonce)
    cipher.update(AAD_PREFIX + kernel_id.encode())
    data, tag = cipher.encrypt_and_digest(json.dumps(plaintext).encode())

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    envelope = {
        "v": PROTOCOL_VERSION,
        "kernel_id": kernel_id,
        "key": b64(PKCS1_OAEP.new(rsa_key, hashAlgo=SHA256).encrypt(aes_key)),
        "nonce": b64(nonce),
        "data": b64(data),
        "tag": b64(tag),
    }
    return json.dumps(envelope).encode()


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 hosts in brackets)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"invalid address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


def send_connection_info(
    response_address: str,
    public_key_b64: str,
    kernel_id: str,
    launch_token: str,
    payload_fields: dict[str, Any],
    timeout: float = 10.0,
    attempts: int = 5,
) -> None:
    """Encrypt and deliver the connection info; raise CallbackError unless the gateway answers ok."""
    plaintext = {"kernel_id": kernel_id, "launch_token": launch_token, **payload_fields}
    envelope = encrypt_payload(public_key_b64, kernel_id, plaintext)
    reply = _deliver(parse_address(response_address), envelope, timeout, attempts)
    try:
        answer = json.loads(reply)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or answer.get("ok") is not True:
        error = answer.get("error") if isinstance(answer, dict) else reply[:200]
        raise CallbackError(f"gateway at {response_address} rejected the connection info: {error}")


class CallbackSender:
    """Sends the callback from a process forked at launch, which imports pycryptodome on another core while the
    launcher imports its kernel; it sends only when `send` hands it the payload fields.

    Fork it before any thread exists. If the launcher dies first, the helper reads EOF and exits silently.
    """

    def __init__(self, response_address: str, public_key_b64: str, kernel_id: str, launch_token: str) -> None:
        self.args = (response_address, public_key_b64, kernel_id, launch_token)
        to_child, self._request = os.pipe()
        self._reply, from_child = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the helper
            os.close(self._request)
            os.close(self._reply)
            os._exit(self._serve(to_child, from_child))
        os.close(to_child)
        os.close(from_child)

    def _serve(self, requests: int, replies: int) -> int:
        try:
            # pycryptodome picks cffi when importable, which costs ~20 ms more CPU to load than its ctypes backend;
            # this short-lived process only encrypts one payload, so it takes the cheaper one
            sys.modules.setdefault("cffi", None)  # type: ignore[arg-type]
            encrypt_payload(self.args[1], self.args[2], {})  # warm imports and native libraries meanwhile
            with os.fdopen(requests, "rb") as pipe:
                data = pipe.read()
            if not data:
                return 0
            send_connection_info(*self.args, json.loads(data))
            os.write(replies, b"ok")
        except BaseException as exc:  # the parent reports it
            os.write(replies, f"{exc}".encode()[:4000] or b"callback failed")
        return 0

    def send(self, payload_fields: dict[str, Any]) -> None:
        """Hand over the payload and wait for the gateway's answer; raise CallbackError on failure."""
        os.write(self._request, json.dumps(payload_fields).encode())
        os.close(self._request)
        with os.fdopen(self._reply, "rb") as pipe:
            answer = pipe.read().decode(errors="replace")
        os.waitpid(self.pid, 0)
        if answer != "ok":
            raise CallbackError(answer or "the callback helper process died")


def _deliver(address: tuple[str, int], envelope: bytes, timeout: float, attempts: int) -> bytes:
    """Send ``envelope`` and return the reply line, retrying while the connection is refused."""
    where = f"{address[0]}:{address[1]}"
    for attempt in range(1, attempts + 1):
        try:
            with socket.create_connection(address, timeout=timeout) as sock:
                sock.sendall(envelope)
                sock.shutdown(socket.SHUT_WR)
                return _recv_line(sock, time.monotonic() + timeout, MAX_MESSAGE)
        except ConnectionRefusedError as exc:
            if attempt == attempts:
                raise CallbackError(f"gateway at {where} refused {attempts} connections: {exc}") from exc
            time.sleep(0.2 * attempt)
        except (OSError, ValueError) as exc:
            raise CallbackError(f"cannot deliver connection info to {where}: {exc!r}") from exc
    raise CallbackError(f"cannot deliver connection info to {where}: no attempts")


# --- control listener ----------------------------------------------------------------------------


def _recv_line(sock: socket.socket, deadline: float, limit: int) -> bytes:
    """Read one ``\\n``-terminated line (or up to EOF) within ``deadline``; at most ``limit`` bytes."""
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


def canonical_request(op: str, args: dict[str, Any]) -> str:
    """The signed form of a control request."""
    return json.dumps({"op": op, "args": args}, sort_keys=True, separators=(",", ":"))


def request_mac(secret: bytes, challenge: str, op: str, args: dict[str, Any]) -> str:
    """hex HMAC-SHA256(secret, challenge + "\\n" + canonical)."""
    message = f"{challenge}\n{canonical_request(op, args)}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


class ControlListener:
    """Authenticated control listener (poll / signal / shutdown / info) for one kernel process.

    ``info(wait)`` (optional) returns the launcher's report for the `info` op, e.g. ``{"spark": {...}}``; it may
    wait up to ``wait`` seconds for a change (such as a SparkSession that is still starting).
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
        first_line_timeout: float = 5.0,
        max_per_peer: int = 4,
        interrupt_signal: int | None = None,
        interrupt_guard: Callable[[], str | None] | None = None,
    ) -> None:
        self.pid, self.pgid, self.timeout, self.info = pid, pgid, timeout, info
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
        self._lock = threading.Lock()
        self._active = 0
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
        try:
            with conn:
                challenge = secrets.token_hex(16)
                conn.settimeout(self.timeout)
                conn.sendall(json.dumps({"challenge": challenge}).encode() + b"\n")
                line = _recv_line(conn, time.monotonic() + self.first_line_timeout, MAX_MESSAGE)
                self._heard(conn)
                op, args = self._authenticate(challenge, line)
                reply, after = self._dispatch(op, args)
                conn.sendall(json.dumps(reply).encode() + b"\n")
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
        if not hmac.compare_digest(mac, request_mac(self.secret, challenge, op, args)):
            raise _Ignored(f"bad MAC for op {op!r}")
        if op not in CONTROL_OPS:
            raise _Ignored(f"unknown op {op!r}")
        return op, args

    def _dispatch(self, op: str, args: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], None] | None]:
        if op == "poll":
            return {"ok": True, "alive": pid_alive(self.pid)}, None
        if op == "info":
            wait = args.get("wait", 0)
            if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= INFO_MAX_WAIT:
                return {"ok": False, "error": f"bad info args {args!r}: wait is 0..{INFO_MAX_WAIT:g} seconds"}, None
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
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True  # no procfs: trust kill(0)


# --- standalone ----------------------------------------------------------------------------------


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


class PolledReport:
    """An `info` report read by polling: ``read()`` gives it, a call waits up to ``wait`` seconds for a change."""

    interval = 0.1

    def read(self) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, wait: float) -> dict[str, Any]:
        """The report, once it differs from what it was when asked, or after ``wait`` seconds."""
        first, deadline = self.read(), time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(self.interval)
            if (report := self.read()) != first:
                return report
        return first


class FileReport(PolledReport):
    """The report of a launcher in another language: the JSON object it keeps in a file (replaced atomically, by
    rename). ``{}`` while the file is missing or unreadable."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                report = json.load(f)
        except (OSError, ValueError):
            return {}
        return report if isinstance(report, dict) else {}


DAG_SCHEDULER_THREAD = "dag-scheduler-event-loop"  # a JVM runs it exactly while it has a SparkContext


class JvmSparkReport(PolledReport):
    """``{"spark": ...}`` of a JVM kernel (Toree) that reports nothing itself: `starting` until PID runs a
    SparkContext's DAG scheduler thread, then `ready` with what the driver's Spark UI (REST API) says about it."""

    interval = 0.25
    UI_GRACE = 15.0  # seconds after the context appears within which its UI must answer (else: spark.ui.enabled off)

    def __init__(self, pid: int, kernel_ports: list[int]) -> None:
        self.pid, self.kernel_ports = pid, set(kernel_ports)
        self._ready: dict[str, Any] | None = None
        self._context_seen = 0.0

    def read(self) -> dict[str, Any]:
        if self._ready is None and has_thread(self.pid, DAG_SCHEDULER_THREAD):
            self._context_seen = self._context_seen or time.monotonic()
            details = self._from_ui()
            if details or time.monotonic() - self._context_seen > self.UI_GRACE:
                self._ready = {"state": "ready", "error": None, "app_id": None, "app_name": None, "master": None,
                               "ui_url": None, "spark_version": None, **details}  # fmt: skip
                log.info("SparkContext of pid %d: %s", self.pid, json.dumps(self._ready, sort_keys=True))
        return {"spark": self._ready or {"state": "starting", "error": None}}

    def _from_ui(self) -> dict[str, Any]:
        """The application's details from the first of PID's listening ports that answers as a Spark UI."""
        for address, port in sorted(process_listening(self.pid), key=lambda a: (not 4040 <= a[1] < 4140, a[1])):
            if port in self.kernel_ports:
                continue
            base = f"http://{address if ':' not in address else f'[{address}]'}:{port}/api/v1"
            try:
                apps = _get_json(f"{base}/applications")
                if not (isinstance(apps, list) and apps and isinstance(apps[0], dict) and "id" in apps[0]):
                    continue
                props = dict(_get_json(f"{base}/applications/{apps[0]['id']}/environment").get("sparkProperties", []))
                version = _get_json(f"{base}/version").get("spark")
            except (OSError, ValueError, AttributeError, TypeError):
                continue
            host = props.get("spark.driver.host") or address
            return {"app_id": apps[0]["id"], "app_name": apps[0].get("name"), "master": props.get("spark.master"),
                    "ui_url": f"http://{host}:{port}", "spark_version": version}  # fmt: skip
        return {}


def _get_json(url: str) -> Any:
    """GET a local URL (a Spark UI's REST API) and parse its JSON; quick to give up on ports that are no UI."""
    with urllib.request.urlopen(url, timeout=1.0) as reply:  # noqa: S310 (http to PID's own listening port)
        return json.loads(reply.read(MAX_MESSAGE * 16))


def configure_logging(*names: str) -> None:
    """Send our loggers (not the root logger: that one belongs to the user's code in the kernel) to a duplicate of
    the current stderr, so a kernel capturing fd 2 does not forward our logs to the notebook."""
    handler = logging.StreamHandler(os.fdopen(os.dup(2), "w", buffering=1))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("server_listener", *names):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def take_launch_token() -> str:
    """Remove GP_LAUNCH_TOKEN from the environment and return it; exit 2 if it is missing."""
    token = os.environ.pop("GP_LAUNCH_TOKEN", "")
    if not token:
        print("error: GP_LAUNCH_TOKEN is not set; the gateway must export it for each launch", file=sys.stderr)
        sys.exit(2)
    return token


def main(argv: list[str] | None = None) -> int:
    """Write the connection file, call back with PID's details, serve control until PID exits."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-id", required=True)
    parser.add_argument("--response-address", required=True)
    parser.add_argument("--public-key", required=True)
    parser.add_argument("--port-range", default="0..0")
    parser.add_argument("--connection-file", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--ip", default=os.environ.get("GP_KERNEL_IP", "0.0.0.0"))
    info = parser.add_mutually_exclusive_group()
    info.add_argument("--info-file", help="JSON object served by the `info` op (the launcher keeps it current)")
    info.add_argument(
        "--spark-report",
        action="store_true",
        help="serve PID's SparkContext as the `info` op's report, found by its thread and Spark UI (JVM kernels)",
    )
    parser.add_argument(
        "--interrupt-signal",
        type=lambda name: signal.Signals[name if name.startswith("SIG") else f"SIG{name}"],
        help="send SIGINT requests for PID as this signal (e.g. USR2)",
    )
    parser.add_argument(
        "--interrupt-needs-thread",
        metavar="NAME",
        help="refuse SIGINT requests while PID has no thread named NAME (with --interrupt-refusal as the reason)",
    )
    parser.add_argument("--interrupt-refusal", default="the kernel cannot be interrupted yet", metavar="TEXT")
    parser.add_argument(
        "--wait-for-ports",
        action="store_true",
        help="call back only once PID's kernel listens on the connection file's ports (no time limit: the "
        "gateway's launch timeout applies)",
    )
    args = parser.parse_args(argv)
    token = take_launch_token()
    configure_logging()
    # SIGTERM (e.g. the `shutdown` op to the group we are in) ends us through `finally`: the files go too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    listener = None
    try:
        pgid = os.getpgid(args.pid)
        ports = select_ports(args.port_range, len(KERNEL_PORT_NAMES) + 1, args.ip)
        info = build_connection_info(ports[:-1], args.ip)
        write_connection_file(args.connection_file, info)
        report: PolledReport | None = None
        if args.info_file:
            report = FileReport(args.info_file)
        elif args.spark_report:
            report = JvmSparkReport(args.pid, ports[:-1])
        needs = args.interrupt_needs_thread
        guard = thread_guard(args.pid, needs, args.interrupt_refusal) if needs else None
        listener = ControlListener(
            args.pid, pgid, port=ports[-1], ip=args.ip, info=report, interrupt_signal=args.interrupt_signal,
            interrupt_guard=guard,
        )  # fmt: skip
        listener.start()
        if args.wait_for_ports:
            wait_for_kernel_ports(args.pid, ports[:-1])
        fields = payload_fields(args.kernel_id, info, args.pid, pgid, listener, args.connection_file)
        send_connection_info(args.response_address, args.public_key, args.kernel_id, token, fields)
    except Exception as exc:  # noqa: BLE001 (logged; the kernel is ended, see the module docstring)
        log.error("error: %s; terminating process %d", exc if isinstance(exc, CallbackError) else repr(exc), args.pid)
        with contextlib.suppress(OSError):
            os.kill(args.pid, signal.SIGTERM)
        return 1
    else:
        log.info("connection info sent for kernel %s; serving control on port %d", args.kernel_id, listener.port)
        while pid_alive(args.pid):
            time.sleep(0.2)
        log.info("process %d exited; listener stops", args.pid)
        return 0
    finally:
        if listener is not None:
            listener.stop()
        for path in (args.connection_file, args.info_file):
            if path:
                remove_file(path)


if __name__ == "__main__":
    sys.exit(main())
