"""Pooled paramiko connections: one per host, reused for launches, signals and shutdowns.

Every blocking paramiko call runs in a dedicated thread pool, so callers on the asyncio loop never block.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paramiko

T = TypeVar("T")
log = logging.getLogger(__name__)

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "localhost.localdomain"}
TRANSPORT_WAKEUP = 2.0  # seconds an idle pooled connection's transport thread sleeps between checks


class SshError(RuntimeError):
    """An SSH failure, with a message that says what to do about it."""


class HostKeyError(SshError):
    """The host's key is unknown or does not match known_hosts."""


class SshAuthError(SshError):
    """The host refused every credential we offered."""


class ChannelOpenError(SshError):
    """No command was started: retrying on a fresh connection is safe."""


@dataclass(frozen=True)
class CommandResult:
    """Exit status and output of one remote command."""

    status: int
    stdout: str
    stderr: str


def split_host_port(entry: str) -> tuple[str, int | None]:
    """Split a `remote_hosts` entry `host`, `host:port` or `[v6addr]:port`."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"remote host entry {entry!r}: port must be a number from 1 to 65535")
        return host, int(port)
    return entry, None


@dataclass
class SshSettings:
    """What the provisioner's configuration says about SSH."""

    config_file: str = "~/.ssh/config"
    port: int = 22
    user: str = ""
    password: str = ""
    gss_auth: bool = False
    connect_timeout: float = 5.0
    known_hosts_files: list[str] = field(default_factory=list)


@dataclass
class Target:
    """A host entry resolved through ssh_config."""

    entry: str
    hostname: str
    port: int
    user: str
    identity_files: list[str]
    known_hosts_files: list[str]
    strict: bool  # StrictHostKeyChecking yes (the default): an unknown host key is refused
    proxy_jump: str | None
    configured: bool  # ssh_config has a block that changes this entry
    accept_new: bool = False  # StrictHostKeyChecking accept-new: trust on first use, saved to known_hosts


def resolve(entry: str, settings: SshSettings) -> Target:
    """Resolve a host entry the way OpenSSH would (Host aliases, HostName, Port, User, ...)."""
    name, port = split_host_port(entry)
    cfg = paramiko.SSHConfig()
    path = Path(os.path.expanduser(settings.config_file))
    if path.is_file():
        cfg = paramiko.SSHConfig.from_path(str(path))
    opts = cfg.lookup(name)
    configured = set(opts) - {"hostname"} != set() or opts.get("hostname", name) != name
    known = [os.path.expanduser(p) for p in settings.known_hosts_files]
    if "userknownhostsfile" in opts:
        known = [os.path.expanduser(p) for p in opts["userknownhostsfile"].split()]
    elif not known:
        known = [os.path.expanduser("~/.ssh/known_hosts")]
    return Target(
        entry=entry,
        hostname=opts.get("hostname", name),
        port=port or int(opts.get("port", settings.port)),
        user=settings.user or opts.get("user") or getpass.getuser(),
        identity_files=[os.path.expanduser(p) for p in opts.get("identityfile", [])],
        known_hosts_files=known,
        strict=opts.get("stricthostkeychecking", "yes").lower() not in ("no", "off", "accept-new"),
        proxy_jump=opts.get("proxyjump"),
        configured=configured,
        accept_new=opts.get("stricthostkeychecking", "yes").lower() == "accept-new",
    )


def is_local(entry: str, settings: SshSettings) -> bool:
    """True when an entry names this machine and nothing asks for SSH (no port, no ssh_config block)."""
    name, port = split_host_port(entry)
    if port is not None:
        return False
    local = LOCAL_NAMES | {socket.gethostname(), socket.getfqdn()}
    return name in local and not resolve(entry, settings).configured


def _default_keys() -> list[str]:
    names = ("id_ed25519", "id_ecdsa", "id_rsa")
    return [str(Path.home() / ".ssh" / n) for n in names if (Path.home() / ".ssh" / n).exists()]


class SshPool:
    """One live paramiko connection per host entry, re-established when it breaks."""

    def __init__(self, settings: SshSettings, threads: int = 32) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sg-ssh")
        self._clients: dict[str, paramiko.SSHClient] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, entry: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(entry, threading.Lock())

    def client(self, entry: str) -> paramiko.SSHClient:
        """The pooled client for `entry`, connecting (or reconnecting) when needed. Blocking."""
        with self._lock(entry):
            client = self._clients.get(entry)
            transport = client.get_transport() if client else None
            if transport is not None and transport.is_active():
                return client  # type: ignore[return-value]
            if client is not None:
                client.close()
            client = self._connect(resolve(entry, self.settings))
            self._clients[entry] = client
            return client

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (paramiko, or anything that may block) in this pool's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def drop(self, entry: str) -> None:
        """Forget a connection (it is broken or the host is going away)."""
        with self._lock(entry):
            client = self._clients.pop(entry, None)
        if client is not None:
            client.close()

    def close(self) -> None:
        for entry in list(self._clients):
            self.drop(entry)

    def _socket(self, t: Target) -> Any:
        if t.proxy_jump:
            jump = self.client(t.proxy_jump.split(",")[0])
            transport = jump.get_transport()
            assert transport is not None
            return transport.open_channel("direct-tcpip", (t.hostname, t.port), ("", 0))
        try:
            sock = socket.create_connection((t.hostname, t.port), timeout=self.settings.connect_timeout)
        except OSError as exc:
            raise SshError(
                f"cannot reach {t.entry} ({t.hostname}:{t.port}): {exc.strerror or exc}. "
                "Check that the host is up, that sshd listens on that port and that no firewall drops it."
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _connect(self, t: Target) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        if os.path.isfile("/etc/ssh/ssh_known_hosts"):
            client.load_system_host_keys("/etc/ssh/ssh_known_hosts")
        for path in t.known_hosts_files:
            if os.path.isfile(path):
                client.load_host_keys(path)
        client.set_missing_host_key_policy(
            paramiko.RejectPolicy() if t.strict else SaveNewKey(t) if t.accept_new else paramiko.WarningPolicy()
        )
        keys = t.identity_files or _default_keys()
        extra = _gss_options() if self.settings.gss_auth else {}
        sock = self._socket(t)
        try:
            client.connect(
                t.hostname,
                port=t.port,
                username=t.user,
                password=self.settings.password or None,
                key_filename=[k for k in keys if os.path.exists(k)] or None,
                look_for_keys=False,
                allow_agent=True,
                sock=sock,
                timeout=self.settings.connect_timeout,
                banner_timeout=self.settings.connect_timeout,
                auth_timeout=self.settings.connect_timeout,
                **extra,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"host key of {t.entry} ({t.hostname}:{t.port}) does not match the one in "
                f"{', '.join(t.known_hosts_files)}: possible man-in-the-middle, or the host was reinstalled. "
                f"If the change is expected, remove the old key with: ssh-keygen -R {_keyscan_name(t)}"
            ) from exc
        except paramiko.SSHException as exc:
            client.close()
            if "not found in known_hosts" in str(exc):
                raise HostKeyError(
                    f"host key of {t.entry} ({t.hostname}:{t.port}) is unknown: refusing to connect. "
                    f"After checking its fingerprint, trust it with: "
                    f"ssh-keyscan -p {t.port} {t.hostname} >> {t.known_hosts_files[-1]}"
                ) from exc
            if isinstance(exc, paramiko.AuthenticationException):
                tried = ", ".join(keys) or "no key files"
                raise SshAuthError(
                    f"authentication as {t.user!r} to {t.entry} ({t.hostname}:{t.port}) failed; tried: {tried}"
                    f"{', ssh-agent keys' if os.environ.get('SSH_AUTH_SOCK') else ''}"
                    f"{', a password' if self.settings.password else ''}"
                    f"{', GSSAPI' if self.settings.gss_auth else ''}. "
                    f"Add the public key to {t.user}'s ~/.ssh/authorized_keys on that host, or set IdentityFile "
                    "in ssh_config / GP_REMOTE_USER."
                ) from exc
            raise SshError(f"SSH to {t.entry} ({t.hostname}:{t.port}) failed: {exc}") from exc
        except (OSError, EOFError) as exc:
            client.close()
            raise SshError(
                f"SSH to {t.entry} ({t.hostname}:{t.port}) failed: {exc or 'the connection was closed during login'}"
            ) from exc
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(15)
        # paramiko's transport thread wakes every 0.1 s (its socket timeout) only to notice that it was closed,
        # which close() tells it anyway: for pooled connections that idle most of their life, those wake-ups were
        # the gateway's largest idle cost. Data still wakes it at once.
        transport.sock.settimeout(TRANSPORT_WAKEUP)
        return client

    def open_session(self, entry: str, command: str) -> paramiko.Channel:
        """Start `command` on a fresh channel of the pooled connection. Blocking.

        A stale pooled connection is replaced once, transparently; the command is started at most once.
        """
        for attempt in (1, 2):
            client = self.client(entry)
            try:
                transport = client.get_transport()
                assert transport is not None
                # a live connection under load may take a while to open a channel: allow more than a TCP connect
                channel = transport.open_session(timeout=max(10.0, self.settings.connect_timeout))
                channel.exec_command(command)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if not (transport and transport.is_active()):
                    self.drop(entry)  # a dead connection; a live one may carry other work: keep it
                if attempt == 2:
                    why = exc or type(exc).__name__
                    raise ChannelOpenError(f"cannot open an SSH channel to {entry}: {why}") from exc
                continue
            return channel
        raise AssertionError("unreachable")

    def run(self, entry: str, command: str, stdin: bytes = b"", timeout: float = 30.0) -> CommandResult:
        """Run `command`, feed it `stdin`, and wait for its exit. Blocking."""
        channel = self.open_session(entry, command)
        try:
            channel.settimeout(timeout)
            if stdin:
                channel.sendall(stdin)
            send_eof(channel)
            out, err = _drain(channel)
            return CommandResult(channel.recv_exit_status(), out, err)
        except TimeoutError as exc:
            raise SshError(f"command on {entry} did not finish within {timeout:g} s: {command!r}") from exc
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise SshError(f"SSH to {entry} broke while running {command!r}: {exc or type(exc).__name__}") from exc
        finally:
            close_quietly(channel)

    def local_address(self, entry: str) -> str | None:
        """Our side's address of the connection to `entry`: an address that host can reach us at."""
        transport = self.client(entry).get_transport()
        sock = transport.sock if transport else None
        if isinstance(sock, socket.socket):
            return sock.getsockname()[0]
        return None  # behind a ProxyJump: our address is not necessarily reachable from the host

    def peer_address(self, entry: str) -> str:
        """The address we reach `entry` at."""
        transport = self.client(entry).get_transport()
        assert transport is not None
        sock = transport.sock
        if isinstance(sock, socket.socket):
            return sock.getpeername()[0]
        return resolve(entry, self.settings).hostname


class SaveNewKey(paramiko.MissingHostKeyPolicy):
    """StrictHostKeyChecking accept-new, as OpenSSH does it: a host's first key is saved to the first
    UserKnownHostsFile (so a different key later is refused as changed); a known host's key must still match."""

    _lock = threading.Lock()

    def __init__(self, target: Target) -> None:
        self.path = Path(target.known_hosts_files[0])

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        with self._lock:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                size = os.fstat(fd).st_size
                unterminated = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
                line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
                os.write(fd, ("\n" if unterminated else "").encode() + line.encode())
            finally:
                os.close(fd)
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("accept-new: trusted and saved the first host key of %s (%s %s) to %s", hostname,
                    key.get_name(), key.fingerprint, self.path)  # fmt: skip


def _gss_options() -> dict[str, bool]:
    """GSSAPI (Kerberos) options, where the installed paramiko still supports them."""
    if "gss_auth" not in inspect.signature(paramiko.SSHClient.connect).parameters:
        raise SshError(
            f"GP_REMOTE_GSS_SSH is set, but paramiko {paramiko.__version__} has no GSSAPI support (removed in "
            "paramiko 5): install 'paramiko<5' and 'gssapi', or use key authentication"
        )
    return {"gss_auth": True, "gss_kex": True}


def close_quietly(channel: paramiko.Channel) -> None:
    """Close a channel whose connection may already be dead."""
    with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
        channel.close()


def send_eof(channel: paramiko.Channel, timeout: float = 30.0) -> None:
    """Half-close our side of `channel` (the command's stdin ends), never after the channel's CLOSE.

    paramiko's shutdown_write() builds its EOF under the channel lock but sends it after releasing it. When the
    command has just ended, the transport thread's CLOSE can then go out first, and OpenSSH drops the whole
    connection, every other channel on it included ("ieof packet referred to nonexistent channel"). Here the EOF
    is built and sent while holding the transport's send lock, which that CLOSE must take too. paramiko never holds
    a channel's lock while it waits for the send lock, so taking them in this order cannot deadlock.
    """
    transport = channel.get_transport()
    if transport is None or not hasattr(transport, "clear_to_send_lock"):  # not the paramiko this was written for
        channel.shutdown_write()
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        transport.clear_to_send.wait(0.1)  # not during a key exchange
        if not transport.is_active():
            raise EOFError("the SSH connection is closed")
        with transport.clear_to_send_lock:
            if transport.clear_to_send.is_set():
                with channel.lock:
                    message = channel._send_eof()  # None when already sent (e.g. with the channel's CLOSE)
                if message is not None:
                    transport._send_message(message)
                return
    raise paramiko.SSHException(f"no key exchange completed within {timeout:g} s")


def _drain(channel: paramiko.Channel) -> tuple[str, str]:
    out, err = bytearray(), bytearray()
    while True:
        data = channel.recv(65536)
        if not data:
            break
        out += data
    while True:
        data = channel.recv_stderr(65536)
        if not data:
            break
        err += data
    return out.decode(errors="replace"), err.decode(errors="replace")


def _keyscan_name(t: Target) -> str:
    return t.hostname if t.port == 22 else f"[{t.hostname}]:{t.port}"
