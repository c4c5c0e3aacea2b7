"""Spark Connect engines on this host, shared by the kernels of one share key (see docs/design.md, Spark Connect).

An engine is a supervisor process (``spark_connect.py serve --engine-key KEY``, its key in argv so the gateway finds
it with ``ps``) that runs ``spark-submit --class ...SparkConnectServer`` bound to 127.0.0.1 on a free port, with a
random token in the server's environment (``SPARK_CONNECT_AUTHENTICATE_TOKEN``, never in an argv). It runs as the
kernel's user (kernel and user levels: the kernel starts it) or as the gateway's engine account (group and server
levels under impersonation: the gateway starts it with ``sudo -u ACCOUNT spark_connect.py ensure``).

Its state lives in ``$GP_ENGINE_DIR/spark_gateway-engines-<uid>-<hostname>`` (default under /tmp; the account's own,
0711: others may enter, never list), one 0711 directory per key: ``engine.json`` (0644, no secret: state, port,
pids, application, UI, the reason it failed), ``token`` (0600), ``engine.log`` (0600), ``kernels/`` and ``grants/``
(0700) and ``engine.sock``, the engine's Unix socket. Kernels attach through that socket: the supervisor reads the
caller's uid and pid from the kernel (SO_PEERCRED, unforgeable) and answers with the port and token only to its own
account, root, or a uid the gateway granted (``ensure --grant USER``); so the token of an engine shared by several
users reaches exactly the kernels the gateway started for it, and a kernel's attachment is the pid of the process
that asked. Each kernel's Connect session id is kept in its own user's directory (``sessions/<kernel id>``, 0700),
never in the shared engine's. The supervisor stops the engine (its application ends) once no attached kernel has
lived for the idle timeout, or at once when the kernel of a kernel-level engine shuts down; its stop decision and
every attachment (``ensure`` and the socket's ``attach``) are taken under the same lock, so a kernel either gets
the engine before it decides to stop or a new one, never a dead port.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import json
import logging
import os
import pwd
import re
import secrets
import shlex
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if not (_HERE / "server_listener.py").exists():  # running from a source checkout
    sys.path.insert(0, str(_HERE.parent.parent / "shared" / "scripts"))

from sg_procinfo import pid_alive  # noqa: E402
from sg_starter import StartState  # noqa: E402

log = logging.getLogger("launch_ipykernel")
SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,160}\Z")
KERNEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
POLL = 1.0  # seconds between the supervisor's looks at its kernels and its JVM
MAX_REVIVALS = 3  # new JVMs an engine-account engine starts after its ready JVM died
STOP_GRACE = 20.0  # seconds the JVM gets to stop its SparkContext before SIGKILL
PENDING = 180.0  # seconds an expected kernel (ensure --expect) keeps its engine up before it attaches
RELEASE_TIMEOUT = 10.0  # seconds a shutting-down kernel gives ReleaseSession
UI_LINE = re.compile(r"Successfully started service 'SparkUI' on port (\d+)")
APP_LINES = (re.compile(r"Connected to Spark cluster with app ID (\S+)"), re.compile(r"Submitted application (\S+)"))


class EngineError(RuntimeError):
    """The engine cannot be used (the message says why and what to do)."""


def state_root(uid: int | None = None) -> Path:
    """The engine directory of account `uid` (default: ours, created 0711). Refused unless that account owns it and
    nobody else may write it."""
    own = uid is None or uid == os.geteuid()
    uid = os.geteuid() if uid is None else uid
    parent = os.environ.get("GP_ENGINE_DIR") or "/tmp"  # shared by every account, like /tmp: each has its own below
    root = Path(parent, f"spark_gateway-engines-{uid}-{socket.gethostname()}")
    if own:
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o711, parents=True)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise EngineError(f"{root} does not exist: no engine of uid {uid} runs on {socket.gethostname()}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        raise EngineError(f"{root} is not a directory of uid {uid} that only it may write: remove it, or set "
                          "GP_ENGINE_DIR to another directory under which each account gets its own")  # fmt: skip
    return root


def engine_dir(key: str, uid: int | None = None) -> Path:
    if not KEY.match(key):
        raise EngineError(f"invalid engine key {key!r}")
    return state_root(uid) / key


def read_state(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "engine.json").read_text())
    except (OSError, ValueError):
        return {}


def write_file(path: Path, text: str, mode: int = 0o600) -> None:
    """Write `text` to `path` atomically with `mode` (never through a symlink)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), mode)
        f.write(text)
    os.replace(tmp, path)


def jvm_alive(state: dict[str, Any]) -> bool:
    """False once the engine's JVM (if started) has exited, even before its supervisor notices."""
    pid = int(state.get("jvm_pid") or 0)
    return pid <= 1 or pid_alive(pid)


def supervisor_alive(state: dict[str, Any], key: str) -> bool:
    pid = int(state.get("pid") or 0)
    if pid <= 1 or not pid_alive(pid):
        return False
    try:
        return key.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


@contextlib.contextmanager
def key_lock(key: str) -> Iterator[None]:
    """The engine's lock (ours): attachments by `ensure` and the supervisor's stop decision are taken under it."""
    path = state_root() / f".{key}.lock"
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def expect(directory: Path, kernel_id: str, uid: int) -> None:
    """Keep the engine up for kernel `kernel_id` (of `uid`) until it attaches, and let `uid` attach."""
    if not KERNEL.match(kernel_id):
        raise EngineError(f"invalid kernel id {kernel_id!r}")
    write_file(directory / "grants" / str(uid), "")
    write_file(directory / "kernels" / kernel_id, json.dumps({"uid": uid, "pending_until": time.time() + PENDING}))


def ensure(key: str, spark_opts: str, idle_timeout: float, level: str, kernel_id: str, uid: int) -> Path:
    """The engine of `key` on this host, ours: the running one, or a new supervisor started now (not waited for);
    either way kernel `kernel_id` of `uid` is expected (the engine does not stop before it attaches)."""
    directory = engine_dir(key)
    with key_lock(key):
        deadline = time.monotonic() + 2 * POLL + STOP_GRACE
        while supervisor_alive(state := read_state(directory), key):
            if state.get("state") in ("starting", "ready") and jvm_alive(state):
                expect(directory, kernel_id, uid)  # under the lock: before any stop decision
                return directory
            if time.monotonic() > deadline:
                raise EngineError(f"the engine {key} is ending (state {state.get('state')}): try again shortly")
            time.sleep(0.2)  # its JVM is gone or it is stopping: its supervisor exits within a POLL
        directory.mkdir(mode=0o711, exist_ok=True)
        for sub in ("kernels", "grants"):
            (directory / sub).mkdir(mode=0o700, exist_ok=True)
            for stale in (directory / sub).iterdir():
                with contextlib.suppress(OSError):
                    stale.unlink()
        for name in ("token", "engine.sock"):
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()
        expect(directory, kernel_id, uid)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KERNEL_", "GP_LAUNCH", "JPY_"))}
        env["SG_ENGINE_SPARK_OPTS"] = spark_opts  # the first kernel's: the engine's key covers them
        logfd = os.open(directory / "engine.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "serve", "--engine-key", key,
                 "--idle-timeout", f"{idle_timeout:g}", "--level", level],
                stdin=subprocess.DEVNULL, stdout=logfd, stderr=logfd, env=env, start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(logfd)
        state = {"state": "starting", "pid": proc.pid, "level": level, "key": key}
        write_file(directory / "engine.json", json.dumps(state), 0o644)
        return directory


def request(directory: Path, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request on the engine's socket; its JSON reply (OSError when the socket cannot be reached)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(directory / "engine.sock"))
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data)
    except ValueError:
        raise OSError(f"the engine's socket gave no answer ({data[:80]!r})") from None


# ------------------------------------------------------------------------------------------------ kernel side


def session_path(kernel_id: str) -> Path:
    """Where this user keeps kernel `kernel_id`'s Connect session id (its own private directory)."""
    sessions = state_root() / "sessions"
    sessions.mkdir(mode=0o700, exist_ok=True)
    return sessions / kernel_id


def session_of(kernel_id: str) -> str:
    """The kernel's Connect session id: the same after a restart, a new one once released."""
    path = session_path(kernel_id)
    try:
        return str(uuid.UUID(path.read_text().strip()))
    except (OSError, ValueError):
        session_id = str(uuid.uuid4())
        write_file(path, session_id)
        return session_id


def forget_session(kernel_id: str) -> None:
    with contextlib.suppress(OSError, EngineError):
        session_path(kernel_id).unlink()


def attach(directory: Path, key: str, kernel_id: str, timeout: float, restart: Any = None) -> dict[str, Any]:
    """Attach this process to the engine and wait until it accepts clients: its state with port and token.

    An engine that is ending (stopping, failed, gone) is started again once by `restart` (our own engines; under
    the engine's lock, see `ensure`), or reported."""
    deadline = time.monotonic() + timeout
    while True:
        state = read_state(directory)
        try:
            reply = request(directory, {"op": "attach", "kernel": kernel_id})
        except OSError as exc:
            alive = supervisor_alive(state, key) and state.get("state") in ("starting", "ready")
            reply = {"ok": False, "state": "starting" if alive else state.get("state") or "gone", "error": str(exc)}
        if reply.get("ok") and reply.get("state") == "ready":
            return reply
        ending = reply.get("state") not in ("starting", "ready")
        if reply.get("state") == "refused":
            raise EngineError(f"the Spark Connect engine {key} refused this kernel: {reply.get('error')}")
        if ending:
            why = state.get("error") or reply.get("error") or "it does not run"
            if restart is None:
                raise EngineError(f"the Spark Connect engine {key} is {reply.get('state')} ({why}): restart the "
                                  "kernel, the gateway then starts a new engine")  # fmt: skip
            log.info("engine %s is %s (%s): starting it again", key, reply.get("state"), why)
            restart, _ = None, restart()
        if time.monotonic() > deadline:
            why = state.get("error") or "see its engine.log"
            raise EngineError(f"the Spark Connect engine {key} was not ready within {timeout:g} s: {why}")
        time.sleep(0.3)


def detach(directory: Path, kernel_id: str, stop: bool = False) -> None:
    """Tell the engine this kernel is gone (`stop`: a kernel-level engine stops now); quiet when it is gone too."""
    with contextlib.suppress(OSError):
        request(directory, {"op": "detach", "kernel": kernel_id, "stop": stop}, timeout=5.0)


# ------------------------------------------------------------------------------------------------ engine side


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def peer(conn: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a Unix socket (from the kernel: unforgeable)."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


class Supervisor:
    """Runs one engine's JVM, serves attachments on its socket, and stops it when it has been idle (no attached
    kernel) for `idle_timeout` s, or when the kernel of a kernel-level engine shuts down."""

    def __init__(self, key: str, idle_timeout: float, level: str) -> None:
        self.key, self.idle_timeout, self.level = key, idle_timeout, level
        self.directory = engine_dir(key)
        self.state: dict[str, Any] = {"state": "starting", "pid": os.getpid(), "level": level, "key": key}
        self.jvm: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.stopping = False
        self.stop_now = False  # the kernel of a kernel-level engine shut down
        self.revivals = 0  # new JVMs after the ready one died (engine-account engines: see `revive`)
        self.token = ""
        self.guard = threading.Lock()  # attachments vs. the stop decision (with key_lock for `ensure`)
        self.server: socket.socket | None = None

    def save(self, **fields: Any) -> None:
        self.state.update(fields)
        write_file(self.directory / "engine.json", json.dumps(self.state), 0o644)

    def start_jvm(self) -> None:
        spark_home = os.environ.get("SPARK_HOME", "")
        submit = Path(spark_home, "bin", "spark-submit")
        if not spark_home or not os.access(submit, os.X_OK):
            raise EngineError(f"SPARK_HOME={spark_home!r} has no bin/spark-submit on {socket.gethostname()}")
        self.token, port = secrets.token_urlsafe(32), free_port()
        write_file(self.directory / "token", self.token)
        opts = shlex.split(os.environ.get("SG_ENGINE_SPARK_OPTS", ""))
        argv = [str(submit), "--class", SERVER_CLASS, *opts, "--name", f"sg-engine-{self.key}",
                "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
                "--conf", f"spark.connect.grpc.binding.port={port}"]  # fmt: skip
        env = dict(os.environ, SPARK_CONNECT_AUTHENTICATE_TOKEN=self.token)
        for name in ("SG_ENGINE_SPARK_OPTS", "PYSPARK_SUBMIT_ARGS", "SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED"):
            env.pop(name, None)
        user = pwd.getpwuid(os.geteuid()).pw_name
        log.info("engine %s (%s level) as %s: %s", self.key, self.level, user, shlex.join(argv))
        self.jvm = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.directory)  # fmt: skip
        self.save(port=port, jvm_pid=self.jvm.pid, user=user, host=socket.gethostname(), started=time.time())
        threading.Thread(target=self._copy_output, name="jvm-output", daemon=True).start()

    def _copy_output(self) -> None:
        assert self.jvm is not None and self.jvm.stdout is not None
        for raw in iter(self.jvm.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            self.lines = (self.lines + [line])[-40:]
            if m := UI_LINE.search(line):
                self.save(ui_url=f"http://{socket.getfqdn()}:{m[1]}")
            for pattern in APP_LINES:
                if m := pattern.search(line):
                    self.save(app_id=m[1])

    # -- the socket
    def serve_socket(self) -> None:
        path = self.directory / "engine.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        os.chmod(path, 0o666)  # noqa: S103 (anyone may ask; only granted uids are answered: SO_PEERCRED)
        server.listen(16)
        self.server = server
        threading.Thread(target=self._accept, args=(server,), name="engine-socket", daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed: the engine stops
            with conn:
                try:
                    conn.settimeout(5.0)
                    data = b""
                    while not data.endswith(b"\n") and len(data) < 4096:
                        if not (chunk := conn.recv(4096)):
                            break
                        data += chunk
                    reply = self.answer(*peer(conn), json.loads(data))
                except (OSError, ValueError) as exc:
                    reply = {"ok": False, "state": "refused", "error": f"bad request: {exc}"}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    def granted(self, uid: int) -> bool:
        return uid in (0, os.geteuid()) or (self.directory / "grants" / str(uid)).exists()

    def answer(self, pid: int, uid: int, message: dict[str, Any]) -> dict[str, Any]:
        """An attach or detach request of process `pid` of `uid`."""
        kernel_id = str(message.get("kernel") or "")
        if (
            not isinstance(message, dict)
            or not KERNEL.match(kernel_id)
            or message.get("op") not in ("attach", "detach")
        ):
            return {"ok": False, "state": "refused", "error": "expected {op: attach|detach, kernel: ID}"}
        if not self.granted(uid):
            log.warning("engine %s: uid %s (pid %s) is not granted: refused", self.key, uid, pid)
            return {"ok": False, "state": "refused", "error": f"uid {uid} was not granted this engine by the gateway"}
        path = self.directory / "kernels" / kernel_id
        with self.guard:
            try:
                owner = json.loads(path.read_text()).get("uid")
            except (OSError, ValueError, AttributeError):
                owner = None
            if owner is not None and owner != uid and uid not in (0, os.geteuid()):
                return {"ok": False, "state": "refused", "error": f"kernel {kernel_id} is another user's"}
            if message["op"] == "detach":
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                if message.get("stop") and self.level == "kernel":
                    self.stop_now = True
                return {"ok": True, "state": self.state["state"]}
            if self.state["state"] not in ("starting", "ready"):
                return {"ok": False, "state": self.state["state"], "error": self.state.get("error") or "it is ending"}
            write_file(path, json.dumps({"uid": uid, "pid": pid}))
        fields = ("state", "port", "user", "host", "pid", "jvm_pid", "app_id", "ui_url", "level", "key")
        reply = {"ok": True, **{name: self.state.get(name) for name in fields}}
        if self.state["state"] == "ready":
            reply["token"] = self.token
        return reply

    def attached(self) -> list[str]:
        """The kernels attached (their process lives) or expected (not yet attached, within PENDING)."""
        alive = []
        for path in (self.directory / "kernels").iterdir():
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            pid = int(entry.get("pid") or 0)
            if (pid > 1 and pid_alive(pid)) or (not pid and entry.get("pending_until", 0) > time.time()):
                alive.append(path.name)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        return alive

    def decide_stop(self) -> bool:
        """Stop now? Decided under the engine's lock and the socket's guard: an attachment is either before it (and
        the engine stays) or after it (and is refused, so the kernel starts a new engine)."""
        with key_lock(self.key), self.guard:
            if self.attached() and not self.stop_now:
                return False
            self.save(state="stopping")
            return True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda s, f: setattr(self, "stopping", True))
        try:
            self.start_jvm()
            self.serve_socket()
        except (EngineError, OSError) as exc:
            self.save(state="failed", error=str(exc))
            log.error("engine %s: %s", self.key, exc)
            return 1
        assert self.jvm is not None
        idle_since = time.monotonic()
        while not self.stopping:
            if (status := self.jvm.poll()) is not None and not self.revive(status):
                return self.failed(status)
            if self.state["state"] == "starting" and accepts(self.state["port"]):
                self.save(state="ready", ready=time.time())
                log.info("engine %s ready on 127.0.0.1:%s", self.key, self.state["port"])
            if self.stop_now and self.decide_stop():
                log.info("engine %s: its kernel shut down; stopping", self.key)
                break
            if self.attached():
                idle_since = time.monotonic()
            elif self.idle_timeout > 0 and time.monotonic() - idle_since >= self.idle_timeout:
                if self.decide_stop():
                    log.info("engine %s: no kernel attached for %g s; stopping", self.key, self.idle_timeout)
                    break
                idle_since = time.monotonic()
            time.sleep(POLL if not self.stop_now else 0.1)
        self.stop()
        return 0

    def why_ended(self, status: int) -> str:
        """Why the JVM exited on its own: its status and its last error lines."""
        marks = ("ERROR", "Exception", "error", "Killed", "signal")
        errors = [line for line in self.lines if any(m in line for m in marks)][-8:] or self.lines[-5:]
        how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return f"its JVM (pid {self.state.get('jvm_pid')}) {how}" + "".join(f"\n  {line}" for line in errors)

    def revive(self, status: int) -> bool:
        """An engine-account engine's kernels cannot start a new engine themselves (only the gateway may `sudo -u`
        its account): when its JVM dies after it was ready, the supervisor starts a new one (at most
        MAX_REVIVALS times), and each kernel re-creates its session on it at its next cell, told why."""
        if not os.environ.get("GP_ENGINE_ACCOUNT") or self.state["state"] != "ready" or self.revivals >= MAX_REVIVALS:
            return False
        reason = self.why_ended(status)
        self.revivals += 1
        log.error("engine %s: %s; starting a new JVM (%d of at most %d)", self.key, reason, self.revivals,
                  MAX_REVIVALS)  # fmt: skip
        with self.guard:
            self.lines = []
            self.save(state="starting", last_failure=reason, app_id=None, ui_url=None)
            try:
                self.start_jvm()
            except (EngineError, OSError) as exc:
                self.save(state="failed", error=f"{reason}; a new JVM could not start: {exc}")
                return False
        return True

    def failed(self, status: int) -> int:
        """The JVM exited on its own: say why in engine.json (with its last lines) for the kernels, and end."""
        if self.server is not None:
            self.server.close()
        reason = self.why_ended(status)
        self.save(state="failed", error=reason)
        log.error("engine %s: %s", self.key, reason)
        return 1

    def stop(self) -> None:
        """Stop the JVM (its shutdown hook ends the application), then remove the engine's directory."""
        self.save(state="stopping")
        if self.server is not None:
            self.server.close()
        if self.jvm is not None and self.jvm.poll() is None:
            self.jvm.terminate()
            try:
                self.jvm.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.jvm.kill()
                self.jvm.wait()
        for sub in ("kernels", "grants"):
            for path in (self.directory / sub).glob("*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                (self.directory / sub).rmdir()
        for name in ("token", "engine.sock", "engine.json", "engine.log"):
            with contextlib.suppress(OSError):
                (self.directory / name).unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()
        log.info("engine %s stopped", self.key)


# ------------------------------------------------------------------------------------------------ the kernel's session


def bounded_retries() -> list[Any]:
    """pyspark's retry policy bounded to seconds: a gone engine fails a query within ~5 s, not after ~10 minutes of
    pyspark's default backoff (the kernel then says why: `ConnectStarter.explain_failure`)."""
    from pyspark.sql.connect.client.retries import DefaultPolicy

    return [DefaultPolicy(max_retries=5, initial_backoff=100, backoff_multiplier=2.0, max_backoff=1500,
                          max_server_retry_delay=2000)]  # fmt: skip


class ConnectStarter(StartState):
    """A connect-mode kernel's `spark` (a Spark Connect session on its engine) and `sql`; the launcher's interface of
    SparkSessionStarter (start, wait, info, install, resolve, objects, real_class, session, state)."""

    names = ("spark", "sql")

    def __init__(self, kernel_id: str, proxy: type) -> None:
        super().__init__()
        self.kernel_id, self.proxy = kernel_id, proxy
        os.environ["SPARK_CONNECT_MODE_ENABLED"] = "1"  # pyspark.sql.functions (udf, ...) then go to the session
        self.key = os.environ.get("GP_ENGINE_KEY", "")
        self.level = os.environ.get("GP_ENGINE_LEVEL", "kernel")
        self.account = os.environ.get("GP_ENGINE_ACCOUNT", "")  # group and server levels under impersonation
        self.idle_timeout = float(os.environ.get("GP_ENGINE_IDLE_TIMEOUT") or 600)
        self.start_timeout = float(os.environ.get("GP_ENGINE_START_TIMEOUT") or 300)
        self.directory: Path | None = None
        self._user_ns: dict[str, Any] | None = None
        self._shown = False

    def start(self) -> None:
        with self._changed:
            self.state, self.error, self.session, self._shown = "starting", "", None, False
        threading.Thread(target=self.create, name="spark-connect", daemon=True).start()

    def own_engine(self) -> bool:
        """Whether this kernel's account runs its engine (else the gateway started it as GP_ENGINE_ACCOUNT)."""
        return not self.account or self.account == pwd.getpwuid(os.geteuid()).pw_name

    def _ensure(self) -> Path:
        opts = os.environ.get("SPARK_OPTS", "")
        return ensure(self.key, opts, self.idle_timeout, self.level, self.kernel_id, os.geteuid())

    def create(self) -> None:
        """Find or start the engine, attach, open this kernel's session; the outcome is in `state`."""
        began = time.monotonic()
        try:
            if not KEY.match(self.key):
                raise EngineError("GP_ENGINE_KEY is not set: this kernel was not started by a connect-mode kernelspec")
            if self.own_engine():
                self.directory = self._ensure()
                restart = self._ensure
            else:
                try:
                    uid = pwd.getpwnam(self.account).pw_uid
                except KeyError:
                    raise EngineError(f"the engine account {self.account!r} does not exist on this host") from None
                self.directory, restart = engine_dir(self.key, uid), None
            session_id = session_of(self.kernel_id)
            log.info("session %s: waiting for engine %s", session_id, self.key)
            engine = attach(self.directory, self.key, self.kernel_id, self.start_timeout, restart)
            atexit.register(detach, self.directory, self.kernel_id)
            from pyspark.sql.connect.session import SparkSession

            user = pwd.getpwuid(os.geteuid()).pw_name  # sessions are keyed by (user_id, session_id)
            url = (
                f"sc://localhost:{int(engine['port'])}/;token={engine['token']};session_id={session_id};user_id={user}"
            )
            session = SparkSession.builder.remote(url).create()  # never an earlier (dead) engine's session
            session.client.set_retry_policies(bounded_retries())
            details = {
                "connect": True,
                "engine": self.key,
                "share_level": self.level,
                "engine_user": engine.get("user"),
                "host": engine.get("host"),
                "session_id": session_id,
                "user_id": user,
                "app_id": session.conf.get("spark.app.id"),
                "app_name": session.conf.get("spark.app.name"),
                "master": session.conf.get("spark.master"),
                "ui_url": read_state(self.directory).get("ui_url"),
                "spark_version": session.version,
                "engine_pid": engine.get("pid"),
                "jvm_pid": engine.get("jvm_pid"),
                "seconds": round(time.monotonic() - began, 3),
            }
        except BaseException as exc:  # noqa: BLE001 (reported, never raised)
            self._finish("failed", error=str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}")
            log.error("Spark Connect session could not be created: %s", self.error)
            return
        self._finish("ready", session=session, details=details)
        log.info("Spark Connect session %s on engine %s (%s level, as %s, application %s) in %.2f s", session_id,
                 self.key, self.level, details["engine_user"], details["app_id"], details["seconds"])  # fmt: skip

    def release(self) -> None:
        """The kernel shuts down for good (no restart): release its session on the engine (its temp views and cached
        data go), forget its session id, and stop a kernel-level engine now."""
        session, directory = self.session, self.directory
        if session is not None and self.engine_gone() is None:
            stopper = threading.Thread(target=session.stop, name="release-session", daemon=True)
            stopper.start()
            stopper.join(RELEASE_TIMEOUT)
            log.info("Spark Connect session %s released", self.details.get("session_id"))
        forget_session(self.kernel_id)
        if directory is not None:
            detach(directory, self.kernel_id, stop=self.level == "kernel")

    def objects(self) -> dict[str, Any]:
        return {"spark": self.session, "sql": self.session.sql}

    def real_class(self, name: str) -> type:
        if self.session is not None:
            return type(self.objects()[name])
        if name == "sql":
            import types

            return types.MethodType
        from pyspark.sql.connect.session import SparkSession

        return SparkSession

    def resolve(self, name: str) -> Any:
        self.wait()
        if self.state == "failed":
            raise EngineError(f"the Spark Connect session could not be created: {self.error}")
        objects = self.objects()
        if not self._shown:
            self._shown = True
            print(self.describe())
            for key, value in list((self._user_ns or {}).items()):
                if key in objects and type(value) is self.proxy:
                    self._user_ns[key] = objects[key]  # type: ignore[index]
        return objects[name]

    def describe(self) -> str:
        d = self.details
        return (f"Spark Connect session {d.get('session_id')} on engine {d.get('engine')} ({d.get('share_level')} "
                f"level, as {d.get('engine_user')} on {d.get('host')}): application {d.get('app_id')} on "
                f"{d.get('master')}; Spark UI: {d.get('ui_url')}")  # fmt: skip

    def engine_gone(self) -> str | None:
        """Why the engine of a ready session is gone, or None while it runs."""
        if self.state != "ready" or self.directory is None:
            return None
        state = read_state(self.directory)
        if state.get("state") == "failed":
            return state.get("error") or "it failed"
        if not supervisor_alive(state, self.key) or state.get("pid") != self.details.get("engine_pid"):
            return f"its supervisor (pid {self.details.get('engine_pid')}) is no longer running"
        if state.get("jvm_pid") != self.details.get("jvm_pid"):  # its supervisor started a new JVM (`revive`)
            return state.get("last_failure") or f"its JVM (pid {self.details.get('jvm_pid')}) was replaced"
        if not jvm_alive(state):
            return f"its JVM (pid {state.get('jvm_pid')}) is no longer running"
        return None

    def install(self, kernel: Any) -> None:
        """`spark` and `sql` (stand-ins until the session exists), `%spark`, an engine check before and after each
        cell, an interrupt that cancels this session's operations only, and the session's release at shutdown."""
        shell = kernel.shell
        self._user_ns = shell.user_ns
        shell.user_ns.update({name: self.proxy(self, name) for name in self.names})
        shell.events.register("pre_run_cell", self._check_engine)
        shell.events.register("post_run_cell", self._explain_failure)
        shell.set_custom_exc((KeyboardInterrupt,), self._on_interrupt)
        shutdown = kernel.do_shutdown

        def do_shutdown(restart: bool) -> Any:
            if not restart:
                try:
                    self.release()
                except Exception as exc:  # noqa: BLE001 (the kernel shuts down regardless)
                    log.warning("cannot release the Spark Connect session: %r", exc)
            return shutdown(restart)

        kernel.do_shutdown = do_shutdown

        def spark(line: str) -> None:
            """%spark: this kernel's Spark Connect session and its engine."""
            owner = f", as {self.account}" if self.account else ""
            if self.state == "starting":
                print(f"Spark Connect engine {self.key} ({self.level} level{owner}): starting")
            elif self.state == "failed":
                print(f"Spark Connect engine {self.key} ({self.level} level{owner}): failed: {self.error}")
            else:
                print(self.describe())

        shell.register_magic_function(spark, "line", "spark")

    def _check_engine(self, info: Any = None) -> None:
        if (reason := self.engine_gone()) is None:
            return
        if not self.own_engine():  # only its supervisor can give it a new JVM (`Supervisor.revive`)
            state = self._revival()
            if not state or state.get("jvm_pid") == self.details.get("jvm_pid"):
                print(f"The Spark Connect engine {self.key} (run as {self.account}) is gone ({reason}); restart the "
                      "kernel: the gateway then starts a new one.", file=sys.stderr)  # fmt: skip
                return
            reason = state.get("last_failure") or reason
        log.warning("engine %s is gone (%s); starting a new one", self.key, reason)
        print(f"The Spark Connect engine {self.key} is gone ({reason}); a new one is starting for `spark`.",
              file=sys.stderr)  # fmt: skip
        if self._user_ns is not None:
            self._user_ns.update({name: self.proxy(self, name) for name in self.names})
        self.start()

    def _revival(self) -> dict[str, Any]:
        """The engine's state once its supervisor has seen its JVM end (within a few POLLs) and started another;
        {} when the engine is failed or gone for good."""
        deadline = time.monotonic() + 3 * POLL
        while True:
            state = read_state(self.directory) if self.directory is not None else {}
            alive = supervisor_alive(state, self.key) and state.get("state") in ("starting", "ready")
            if not alive or state.get("jvm_pid") != self.details.get("jvm_pid") or time.monotonic() > deadline:
                return state if alive else {}
            time.sleep(0.2)

    def _explain_failure(self, result: Any) -> None:
        """A cell that failed because the engine went away: say so, with the engine's reason and last lines."""
        if getattr(result, "error_in_exec", None) is not None and (reason := self.engine_gone()) is not None:
            print(f"The Spark Connect engine {self.key} went away while the cell ran: {reason}", file=sys.stderr)

    def _on_interrupt(self, shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> None:
        """KeyboardInterrupt in a cell: interrupt this session's operations on the engine (no other session's)."""
        if self.session is not None:
            try:
                self.session.interruptAll()
            except Exception as exc:  # noqa: BLE001
                log.warning("interrupt: cannot interrupt the Spark Connect operations: %r", exc)
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset)


def main(argv: list[str] | None = None) -> int:
    """`serve` (the supervisor) or `ensure` (the gateway, as the engine account: start or join the engine of a key
    and let kernel --expect of user --grant attach; prints the engine's state as JSON)."""
    parser = argparse.ArgumentParser(description="spark_gateway Spark Connect engine")
    parser.add_argument("command", choices=("serve", "ensure"))
    parser.add_argument("--engine-key", required=True)
    parser.add_argument("--idle-timeout", type=float, default=600.0)
    parser.add_argument("--level", default="user")
    parser.add_argument("--expect", default="", help="ensure: the kernel id that will attach")
    parser.add_argument("--grant", default="", help="ensure: the user whose kernel it is")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s spark_connect %(levelname)s %(message)s")
    if args.command == "serve":
        return Supervisor(args.engine_key, args.idle_timeout, args.level).run()
    try:
        try:
            uid = pwd.getpwnam(args.grant).pw_uid
        except KeyError:
            raise EngineError(f"user {args.grant!r} does not exist on {socket.gethostname()}") from None
        opts = os.environ.get("SPARK_OPTS", "")
        directory = ensure(args.engine_key, opts, args.idle_timeout, args.level, args.expect, uid)
    except (EngineError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = read_state(directory)
    print(
        json.dumps(
            {
                "ok": True,
                "state": state.get("state"),
                "pid": state.get("pid"),
                "user": pwd.getpwuid(os.geteuid()).pw_name,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
