"""A lab of real SSH hosts on this machine, for end-to-end tests of spark_gateway.

``HostLab.start(n)`` brings up ``n`` hosts named ``sg-host1`` .. ``sg-hostN``, each running
its own ``/usr/sbin/sshd``, and writes the client side (identity, ``known_hosts``, an
OpenSSH client config) to a private temp dir. ``lab.stop()`` removes everything again.

Two modes:

``netns`` (preferred, needs root)
    One bridge ``sgbr0`` (10.250.0.1/24) in the root namespace; per host a network
    namespace ``sgh-<runid>-<i>`` joined by a veth pair (``eth0`` inside, 10.250.0.x/24, no
    default route, so a host can reach the gateway and the other hosts only). A *keeper*
    process holds a private mount, UTS and PID namespace for the host (its init reaps orphans):
    its own hostname, its own ``/etc/hosts``, empty root dotfiles, private login
    records and a private tmpfs on ``/usr/local/share/jupyter/kernels``. sshd runs inside
    the keeper's namespaces, so it can be stopped and started again without losing the
    host's state, and processes started over SSH live on in the host.

``loopback`` (fallback when ``ip netns add`` fails)
    sshd on loopback addresses 127.0.0.2, 127.0.0.3, ... (port 22 when it can be bound,
    otherwise a free high port). Hosts share this machine's hostname and filesystem.

Names carry a random run id, so concurrent labs do not collide; a lab that crashed is
recognised (its temp dir is no longer ``flock``-ed) and swept away by the next ``start``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
BRIDGE = "sgbr0"
BRIDGE_ALIAS = "sg-hostlab"  # marks a bridge this module created (and may delete)
GATEWAY_ADDRESS = "10.250.0.1"
SUBNET_PREFIX = "10.250.0."
FIRST_HOST_OCTET = 11  # host i (1-based) is 10.250.0.(10 + i) in the first lab
NETNS_PREFIX = "sgh-"
VETH_PREFIX = "sgv"
DIR_PREFIX = "sg-hostlab-"
# What a lab's names look like; group 1 is the run id (6 hex digits).
NETNS_RE = re.compile(rf"{NETNS_PREFIX}([0-9a-f]{{6}})-\d+")
VETH_RE = re.compile(rf"{VETH_PREFIX}([0-9a-f]{{6}})-\d+")
DIR_RE = re.compile(rf"{DIR_PREFIX}([0-9a-f]{{6}})-\w+")
NETNS_DIR = Path("/run/netns")
PRIVSEP_DIR = Path("/run/sshd")
KERNELS_DIR = "/usr/local/share/jupyter/kernels"
# Login records sshd writes itself when UsePAM is off; each host gets private copies.
LOGIN_RECORDS = ("/var/log/wtmp", "/var/log/btmp", "/var/log/lastlog", "/run/utmp")
# Root's dotfiles: bash sources ~/.bashrc for commands run by sshd, so they are emptied.
ROOT_DOTFILES = ("/root/.bashrc", "/root/.profile")

CMD_TIMEOUT = 20.0  # bound for every helper subprocess
# PID 1 of a host's PID namespace: reaps orphans (detached kernels) as a real init does.
REAPER = (
    "import os, signal\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD, signal.SIGTERM])\n"
    "while True:\n"
    "    if signal.sigwaitinfo([signal.SIGCHLD, signal.SIGTERM]).si_signo == signal.SIGTERM: break\n"
    "    try:\n"
    "        while os.waitpid(-1, os.WNOHANG)[0] > 0: pass\n"
    "    except ChildProcessError: pass\n"
)
READY_TIMEOUT = 15.0  # bound for a host's keeper / sshd to come up
POLL_INTERVAL = 0.02
# Environment of the keeper and sshd (sshd builds its sessions' environment itself).
HOST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class HostLabError(RuntimeError):
    """The lab could not be brought up or operated."""


class HostLabUnsupported(HostLabError):
    """The requested operation is not available in this mode or on this machine."""


# --------------------------------------------------------------------------- helpers


def _run(
    cmd: list[str], *, check: bool = True, timeout: float = CMD_TIMEOUT, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a helper command with a timeout; on failure raise with its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, check=False)
    if check and proc.returncode != 0:
        raise HostLabError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate()`` every few milliseconds until true or ``timeout`` elapses."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    """The command line of ``pid`` (``[comm]`` for kernel threads and zombies, '' if gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        if raw:
            return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        return f"[{Path(f'/proc/{pid}/comm').read_text().strip()}]"
    except OSError:
        return ""


def _netns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _pids_in_netns(netns_id: str) -> list[int]:
    """Pids whose network namespace link reads ``netns_id`` (``net:[inode]``)."""
    return [pid for pid in _all_pids() if _netns_of(pid) == netns_id]


def _descendants(root: int) -> list[int]:
    """All live descendants of ``root`` (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        parent = _ppid(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill(pids: list[int], timeout: float = 2.0) -> None:
    """SIGTERM ``pids``, then SIGKILL whatever is still alive after ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        live = [pid for pid in pids if _alive(pid)]
        for pid in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if _wait_until(lambda live=live: not any(_alive(p) for p in live), wait):
            return


def _reap(proc: subprocess.Popen[bytes] | None) -> None:
    """Collect the exit status of a child we started (it was already signalled)."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _ssh_banner(address: str, port: int) -> bool:
    """True once something at ``address:port`` answers with an SSH banner."""
    try:
        with socket.create_connection((address, port), timeout=0.5) as sock:
            sock.settimeout(0.5)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _keygen(path: Path, comment: str) -> str:
    """Generate an ed25519 key pair at ``path``; return the public key line."""
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path.with_suffix(".pub").read_text().strip()


def _link_names() -> list[str]:
    out = _run(["ip", "-o", "link", "show"]).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def _netns_names() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


@contextlib.contextmanager
def _global_lock(timeout: float = 30.0) -> Iterator[None]:
    """Serialise lab set-up and tear-down across processes.

    The lock is an ``flock`` on the temp directory itself, so it leaves no file behind.
    """
    fd = os.open(tempfile.gettempdir(), os.O_RDONLY)
    try:
        if not _wait_until(lambda: _try_lock(fd), timeout):
            raise HostLabError(f"timed out waiting for the lab lock on {tempfile.gettempdir()}")
        yield
    finally:
        os.close(fd)


def _lab_dirs(runid: str) -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}{runid}-*"))


def _is_live_run(runid: str) -> bool:
    """A run is live while its owner holds the ``flock`` on its temp dir.

    A dir we may not open (another user's lab) counts as live.
    """
    for lab_dir in _lab_dirs(runid):
        try:
            fd = os.open(lab_dir, os.O_RDONLY)
        except FileNotFoundError:
            continue
        except OSError:
            return True
        try:
            if not _try_lock(fd):
                return True
        finally:
            os.close(fd)
    return False


def _sweep_stale() -> None:
    """Remove namespaces, veths, processes and temp dirs of labs whose owner died.

    Must be called with the global lock held.
    """
    for ns in _netns_names():
        match = NETNS_RE.fullmatch(ns)
        if match is None or _is_live_run(match[1]):
            continue
        with contextlib.suppress(OSError):
            _kill(_pids_in_netns(f"net:[{(NETNS_DIR / ns).stat().st_ino}]"))
        _run(["ip", "netns", "delete", ns], check=False)
    for link in _link_names():
        match = VETH_RE.fullmatch(link)
        if match is not None and not _is_live_run(match[1]):
            _run(["ip", "link", "delete", link], check=False)
    for lab_dir in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        match = DIR_RE.fullmatch(lab_dir.name)
        if match is None or _is_live_run(match[1]):
            continue
        marker = str(lab_dir) + "/"
        _kill([pid for pid in _all_pids() if marker in _cmdline(pid)])  # loopback sshds
        shutil.rmtree(lab_dir, ignore_errors=True)


def _bridge_ports() -> list[str]:
    out = _run(["ip", "-o", "link", "show", "master", BRIDGE], check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def _ensure_bridge() -> None:
    """Create the lab bridge (marked with an alias), or reuse an existing one."""
    if BRIDGE not in _link_names():
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "link", "set", BRIDGE, "alias", BRIDGE_ALIAS])
    addresses = _run(["ip", "-4", "-o", "addr", "show", "dev", BRIDGE]).stdout
    if f" {GATEWAY_ADDRESS}/" not in addresses:
        _run(["ip", "addr", "add", f"{GATEWAY_ADDRESS}/24", "dev", BRIDGE])
    _run(["ip", "link", "set", BRIDGE, "up"])


def _remove_bridge_if_unused() -> None:
    """Delete the bridge if this module created it and no lab uses it any more."""
    if BRIDGE not in _link_names() or _bridge_ports():
        return
    details = _run(["ip", "link", "show", BRIDGE], check=False).stdout
    if f"alias {BRIDGE_ALIAS}" in details:
        _run(["ip", "link", "delete", BRIDGE], check=False)


def _used_lab_addresses() -> set[str]:
    """Addresses held by lab hosts of any live lab (looked up in their namespaces)."""
    used: set[str] = set()
    for ns in _netns_names():
        if NETNS_RE.fullmatch(ns):
            out = _run(["ip", "-n", ns, "-4", "-o", "addr", "show"], check=False).stdout
            used.update(line.split()[3].split("/")[0] for line in out.splitlines())
    return used


def _bindable(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- hosts


@dataclass
class LabHost:
    """One SSH host of the lab.

    ``hostname`` is what ``socket.gethostname()`` returns on the host (its own name in
    netns mode, this machine's name in loopback mode); ``netns`` is None in loopback mode.
    """

    name: str
    address: str
    port: int
    hostname: str
    netns: str | None
    dir: Path = field(repr=False)
    veth: str | None = field(default=None, repr=False)
    _keeper: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _sshd: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    # ----------------------------------------------------------------- commands

    @property
    def sshd_config(self) -> Path:
        """The sshd configuration file of this host."""
        return self.dir / "sshd_config"

    @property
    def sshd_log(self) -> Path:
        """sshd's stderr (``-e``, LogLevel VERBOSE), appended across restarts."""
        return self.dir / "sshd.log"

    @property
    def sshd_pid(self) -> int | None:
        """Pid of the listening sshd, or None while it is stopped."""
        return self._sshd.pid if self._sshd is not None and self._sshd.poll() is None else None

    def _nsenter(self, fork: bool = True) -> list[str]:
        """Command prefix that enters the host's namespaces ([] in loopback mode).

        The host has its own PID namespace (as a real host has its own process table); without ``fork``
        the command itself stays outside it but everything it starts (sshd's sessions) is inside.
        """
        if self.netns is None:
            return []
        if self._keeper is None:
            raise HostLabError(f"{self.name} has been torn down")
        init = Path(f"/proc/{self._keeper.pid}/task/{self._keeper.pid}/children").read_text().split()[0]
        return ["nsenter", "-t", init, "-n", "-m", "-u", "-p", *([] if fork else ["-F"]), "--"]

    def run(
        self, cmd: list[str], check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the host (its network, mount and UTS namespaces), as root.

        Output is captured as text; ``check`` raises ``subprocess.CalledProcessError``.
        """
        return subprocess.run(
            [*self._nsenter(), *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=check,
        )

    def processes(self) -> list[tuple[int, str]]:
        """``(pid, cmdline)`` of every live (non-zombie) process running on this host.

        netns mode: every process in the host's network namespace, except the lab's own
        keeper and the sshd listener. Loopback mode: the listener's descendants plus every
        process whose ``SSH_CONNECTION`` names this host's address and port.
        """
        own = {p.pid for p in (self._keeper, self._sshd) if p is not None}
        if self._keeper is not None:
            own |= set(_descendants(self._keeper.pid)[:1])  # the host's init
        if self.netns is not None:
            pids = _pids_in_netns(self._netns_id())
        else:
            pids = sorted(set(self._ssh_session_pids()) | set(self._pids_by_ssh_connection()))
        return [(pid, _cmdline(pid)) for pid in pids if pid not in own and _alive(pid)]

    def _netns_id(self) -> str:
        assert self.netns is not None
        return f"net:[{(NETNS_DIR / self.netns).stat().st_ino}]"

    def _ssh_session_pids(self) -> list[int]:
        pid = self.sshd_pid
        return _descendants(pid) if pid is not None else []

    def _pids_by_ssh_connection(self) -> list[int]:
        found = []
        for pid in _all_pids():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for entry in environ:
                if entry.startswith(b"SSH_CONNECTION="):
                    parts = entry.split(b"=", 1)[1].split()
                    if parts[2:4] == [self.address.encode(), str(self.port).encode()]:
                        found.append(pid)
                    break
        return found

    # ----------------------------------------------------------------- sshd

    def start_sshd(self) -> None:
        """Start the host's sshd (no-op if it runs) and wait until it sends its banner."""
        if self.sshd_pid is not None:
            return
        _reap(self._sshd)
        with self.sshd_log.open("ab") as log:
            self._sshd = subprocess.Popen(
                [*self._nsenter(fork=False), SSHD, "-D", "-e", "-f", str(self.sshd_config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=HOST_ENV,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while not _ssh_banner(self.address, self.port):
            if self._sshd.poll() is not None or time.monotonic() >= deadline:
                _reap(self._sshd)
                raise HostLabError(
                    f"sshd of {self.name} ({self.address}:{self.port}) did not start "
                    f"(exit {self._sshd.returncode}); log:\n{_tail(self.sshd_log)}"
                )
            time.sleep(POLL_INTERVAL)

    def stop_sshd(self, drop_connections: bool = True) -> None:
        """Stop the sshd listener; new connections are refused until ``start_sshd``.

        With ``drop_connections`` the per-connection sshd processes are killed too, so
        open SSH connections break as if the host went away. Processes started over SSH
        (e.g. detached kernels) keep running either way.
        """
        if self._sshd is None:
            return
        sessions = [pid for pid in self._ssh_session_pids() if _cmdline(pid).startswith("sshd")]
        _kill([self._sshd.pid])
        _reap(self._sshd)
        self._sshd = None
        if drop_connections:
            _kill(sessions)

    # ----------------------------------------------------------------- network

    def cut_network(self) -> None:
        """Unplug the host: set the root side of its veth down (netns mode only)."""
        self._set_link("down")

    def restore_network(self) -> None:
        """Plug the host back in after ``cut_network``."""
        self._set_link("up")

    def _set_link(self, state: str) -> None:
        if self.veth is None:
            raise HostLabUnsupported("cut_network/restore_network need netns mode")
        _run(["ip", "link", "set", self.veth, state])

    def firewall_ssh_only(self) -> None:
        """Drop every inbound connection to the host except SSH (port 22).

        Outbound traffic and replies stay allowed. Uses nft, else iptables, inside the
        host's network namespace; raises ``HostLabUnsupported`` if neither is installed
        or in loopback mode.
        """
        if self.netns is None:
            raise HostLabUnsupported("firewall_ssh_only needs netns mode")
        if shutil.which("nft"):
            ruleset = (
                "table inet sg_hostlab {\n"
                "  chain input {\n"
                "    type filter hook input priority 0; policy drop;\n"
                "    iif lo accept\n"
                "    ct state established,related accept\n"
                f"    tcp dport {self.port} accept\n"
                "  }\n"
                "}\n"
            )
            _run(["ip", "netns", "exec", self.netns, "nft", "-f", "-"], input=ruleset)
        elif shutil.which("iptables"):
            rules = [
                ["-A", "INPUT", "-i", "lo", "-j", "ACCEPT"],
                ["-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                ["-A", "INPUT", "-p", "tcp", "--dport", str(self.port), "-j", "ACCEPT"],
                ["-P", "INPUT", "DROP"],
            ]
            for rule in rules:
                _run(["ip", "netns", "exec", self.netns, "iptables", *rule])
        else:
            raise HostLabUnsupported("neither nft nor iptables is installed")

    # ----------------------------------------------------------------- teardown

    def _teardown(self) -> None:
        """Kill everything on the host and remove its namespace and veth."""
        if self.netns is not None and (NETNS_DIR / self.netns).exists():
            _kill(_pids_in_netns(self._netns_id()))
        else:
            sessions = self._ssh_session_pids()
            if self._sshd is not None:
                _kill([self._sshd.pid])
            _kill(sessions + self._pids_by_ssh_connection())
        _reap(self._sshd)
        _reap(self._keeper)
        self._sshd = self._keeper = None
        if self.netns is not None:
            _run(["ip", "netns", "delete", self.netns], check=False)
        if self.veth is not None and self.veth in _link_names():
            _run(["ip", "link", "delete", self.veth], check=False)


# --------------------------------------------------------------------------- the lab


@dataclass
class HostLab:
    """``n`` SSH hosts plus the client-side files to reach them (see module docstring)."""

    hosts: list[LabHost]
    ssh_config: Path
    known_hosts: Path
    identity: Path
    gateway_address: str
    mode: str
    dir: Path = field(repr=False)
    runid: str = field(repr=False)
    _lock_fd: int | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, init=False, repr=False)

    @classmethod
    def start(cls, n: int = 3, mode: str = "auto") -> HostLab:
        """Bring up ``n`` hosts; ``mode`` is "auto" (netns, else loopback), "netns" or "loopback"."""
        if mode not in ("auto", "netns", "loopback"):
            raise ValueError(f"unknown mode {mode!r}")
        if not 1 <= n <= 200:
            raise ValueError("n must be between 1 and 200")
        runid = secrets.token_hex(3)
        lab_dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{runid}-"))
        lock_fd = os.open(lab_dir, os.O_RDONLY)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # marks this run as live for _sweep_stale
        lab = cls(
            hosts=[],
            ssh_config=lab_dir / "ssh_config",
            known_hosts=lab_dir / "known_hosts",
            identity=lab_dir / "id_ed25519",
            gateway_address=GATEWAY_ADDRESS,
            mode=mode,
            dir=lab_dir,
            runid=runid,
            _lock_fd=lock_fd,
        )
        atexit.register(lab.stop)
        try:
            lab._start(n, mode)
        except BaseException:
            lab.stop()
            raise
        return lab

    # ----------------------------------------------------------------- start

    def _start(self, n: int, mode: str) -> None:
        client_pub = _keygen(self.identity, f"sg-hostlab-{self.runid}")
        (self.dir / "authorized_keys").write_text(client_pub + "\n")
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # sshd refuses to start without it
        # Held until every sshd listens, so concurrent labs never pick the same address.
        with _global_lock():
            _sweep_stale()
            self.mode = "loopback" if mode == "loopback" else self._try_netns(mode)
            if self.mode == "netns":
                self._create_netns_hosts(n)
            else:
                self.gateway_address = "127.0.0.1"
                self._create_loopback_hosts(n)
            for host in self.hosts:
                self._write_host_files(host)
            for host in self.hosts:
                self._start_keeper(host)
            for host in self.hosts:
                self._wait_keeper(host)
            for host in self.hosts:
                host.start_sshd()
        self._write_client_files(pwd.getpwuid(os.geteuid()).pw_name)

    def _try_netns(self, mode: str) -> str:
        """Create the first namespace as a probe; fall back to loopback if it fails."""
        probe = f"{NETNS_PREFIX}{self.runid}-1"
        proc = _run(["ip", "netns", "add", probe], check=False)
        if proc.returncode == 0:
            return "netns"
        if mode == "netns":
            raise HostLabError(f"ip netns add failed: {proc.stderr.strip()}")
        return "loopback"

    def _create_netns_hosts(self, n: int) -> None:
        """Bridge, namespaces, veths and addresses (global lock held)."""
        _ensure_bridge()
        used = _used_lab_addresses()
        free = (f"{SUBNET_PREFIX}{o}" for o in range(FIRST_HOST_OCTET, 255))
        addresses = [a for a in free if a not in used][:n]
        if len(addresses) < n:
            raise HostLabError("no free lab addresses left in 10.250.0.0/24")
        for i, address in enumerate(addresses, start=1):
            name = f"sg-host{i}"
            ns = f"{NETNS_PREFIX}{self.runid}-{i}"
            veth = f"{VETH_PREFIX}{self.runid}-{i}"
            host_dir = self.dir / name
            host_dir.mkdir()
            host = LabHost(name, address, 22, name, ns, host_dir, veth)
            self.hosts.append(host)
            if i > 1:
                _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
            # A crashed or just-stopped lab may have left this address in the neighbour
            # cache with its old MAC; connections would then hang until the entry expires.
            _run(["ip", "neigh", "flush", "to", address, "dev", BRIDGE], check=False)
            _run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _create_loopback_hosts(self, n: int) -> None:
        """127.0.0.2, 127.0.0.3, ... on port 22 where it is free (skipping addresses other
        labs use); free high ports on 127.0.0.2.. if port 22 cannot be had (not root, or an
        sshd listening on 0.0.0.0:22)."""
        on_22 = [(a, 22) for a in (f"127.0.0.{o}" for o in range(2, 255)) if _bindable(a, 22)][:n]
        if len(on_22) < n:
            on_22 = [(f"127.0.0.{i + 2}", _free_port(f"127.0.0.{i + 2}")) for i in range(n)]
        for i, (address, port) in enumerate(on_22, start=1):
            host_dir = self.dir / f"sg-host{i}"
            host_dir.mkdir()
            self.hosts.append(LabHost(f"sg-host{i}", address, port, socket.gethostname(), None, host_dir))

    def _write_host_files(self, host: LabHost) -> None:
        """Host key, sshd_config, /etc/hosts and the keeper's setup script."""
        key = host.dir / "ssh_host_ed25519_key"
        _keygen(key, host.name)
        host.sshd_config.write_text(
            "\n".join(
                [
                    f"ListenAddress {host.address}",
                    f"Port {host.port}",
                    f"HostKey {key}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    "UsePAM no",
                    "StrictModes no",
                    "PidFile none",
                    "AcceptEnv none",
                    "MaxSessions 100",
                    "MaxStartups 100:30:200",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "X11Forwarding no",
                    "Subsystem sftp internal-sftp",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        if host.netns is None:
            return
        lines = ["127.0.0.1 localhost", f"{GATEWAY_ADDRESS} gateway"]
        lines += [f"{h.address} {h.name}" for h in self.hosts]
        (host.dir / "hosts").write_text("\n".join(lines) + "\n")
        (host.dir / "empty").write_text("")
        (host.dir / "ready").unlink(missing_ok=True)
        (host.dir / "setup.sh").write_text(self._setup_script(host))

    def _setup_script(self, host: LabHost) -> str:
        """Shell run by the keeper inside its fresh mount + UTS namespaces."""
        q = shlex.quote
        d = host.dir
        cmds = ["set -eu", f"hostname {q(host.name)}", f"mount --bind {q(str(d / 'hosts'))} /etc/hosts"]
        cmds += [f"mount --bind {q(str(d / 'empty'))} {p}" for p in ROOT_DOTFILES if Path(p).exists()]
        for record in LOGIN_RECORDS:
            if Path(record).exists():
                private = d / Path(record).name
                private.write_text("")
                cmds.append(f"mount --bind {q(str(private))} {record}")
        cmds += self._private_dir_cmds(host, KERNELS_DIR)
        cmds += [f"touch {q(str(d / 'ready'))}", f"exec {q(sys.executable)} -c {q(REAPER)}"]
        return "\n".join(cmds) + "\n"

    def _private_dir_cmds(self, host: LabHost, path: str) -> list[str]:
        """Commands giving the host a private tmpfs at ``path``.

        If ``path`` does not exist, its deepest existing ancestor is overlaid with a
        per-host upper dir first, so the mount point is created privately and this
        machine's filesystem is left untouched.
        """
        q = shlex.quote
        cmds = []
        target = Path(path)
        if not target.exists():
            ancestor = next(p for p in target.parents if p.exists())
            if self.dir.is_relative_to(ancestor):
                raise HostLabError(f"cannot make {path} private: lab dir is under {ancestor}")
            upper, work = host.dir / "overlay" / "upper", host.dir / "overlay" / "work"
            upper.mkdir(parents=True)
            work.mkdir()
            options = f"lowerdir={ancestor},upperdir={upper},workdir={work}"
            cmds += [f"mount -t overlay overlay -o {q(options)} {q(str(ancestor))}", f"mkdir -p {q(path)}"]
        cmds.append(f"mount -t tmpfs -o mode=0755 {q(host.name)} {q(path)}")
        return cmds

    def _start_keeper(self, host: LabHost) -> None:
        """Start the process that holds the host's mount and UTS namespaces (netns mode)."""
        if host.netns is None:
            return
        with (host.dir / "keeper.log").open("wb") as log:
            host._keeper = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--pid", "--fork",
                 "--mount-proc", "--propagation", "private", "/bin/sh", str(host.dir / "setup.sh")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=HOST_ENV,
            )  # fmt: skip

    def _wait_keeper(self, host: LabHost) -> None:
        keeper = host._keeper
        if keeper is None:
            return
        ready = host.dir / "ready"
        if not _wait_until(lambda: ready.exists() or keeper.poll() is not None, READY_TIMEOUT) or (not ready.exists()):
            raise HostLabError(
                f"namespace setup of {host.name} failed (exit {keeper.poll()}):\n{_tail(host.dir / 'keeper.log')}"
            )

    def _write_client_files(self, user: str) -> None:
        """known_hosts (by name and by address) and the OpenSSH client config."""
        known, config = [], []
        for host in self.hosts:
            pub = " ".join((host.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2])
            names = [host.name, host.address]
            if host.port != 22:
                names = [f"[{name}]:{host.port}" for name in names]
            known.append(f"{','.join(names)} {pub}")
            config += [
                f"Host {host.name}",
                f"    HostName {host.address}",
                f"    Port {host.port}",
                f"    User {user}",
                f"    IdentityFile {self.identity}",
                f"    UserKnownHostsFile {self.known_hosts}",
                "    StrictHostKeyChecking yes",
                "    IdentitiesOnly yes",
                "",
            ]
        self.known_hosts.write_text("\n".join(known) + "\n")
        self.ssh_config.write_text("\n".join(config))

    # ----------------------------------------------------------------- access

    def host(self, name: str) -> LabHost:
        """The host called ``name`` (e.g. ``"sg-host2"``)."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    # ----------------------------------------------------------------- stop

    def stop(self) -> None:
        """Tear everything down: processes, namespaces, veths, the bridge (if unused and
        created by a lab), the temp dir. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        errors = []
        for host in self.hosts:
            try:
                host._teardown()
            except Exception as exc:  # keep tearing down the other hosts
                errors.append(f"{host.name}: {exc}")
        if self.mode == "netns":
            probe = f"{NETNS_PREFIX}{self.runid}-1"  # exists even if host creation failed early
            if (NETNS_DIR / probe).exists():
                _run(["ip", "netns", "delete", probe], check=False)
            with _global_lock():
                _remove_bridge_if_unused()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise HostLabError("lab teardown incomplete: " + "; ".join(errors))


@contextlib.contextmanager
def lab_hosts(n: int = 3, mode: str = "auto") -> Iterator[HostLab]:
    """``with lab_hosts(3) as lab: ...`` -- a lab that is stopped on exit."""
    lab = HostLab.start(n, mode=mode)
    try:
        yield lab
    finally:
        lab.stop()
