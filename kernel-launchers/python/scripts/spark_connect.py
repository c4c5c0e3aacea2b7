"""Spark Connect engines on this host, shared by the kernels of one share key (see docs/design.md, Spark Connect).

An engine is a supervisor process (``spark_connect.py serve --engine-key KEY``, its key in argv so the gateway finds
it with ``ps``) that runs ``spark-submit --class ...SparkConnectServer`` bound to 127.0.0.1 on a free port, with a
random token in the server's environment (``SPARK_CONNECT_AUTHENTICATE_TOKEN``, never in an argv). Its state lives
in ``$GP_ENGINE_DIR`` (default ``/tmp/spark_gateway-engines-<uid>-<hostname>``, 0700, the user's own directory), one
directory per key: ``engine.json`` (state, port, pids, UI), ``token`` (0600), ``engine.log``, ``kernels/<id>``
(the pid of each attached kernel) and ``sessions/<id>`` (each kernel's Connect session id, kept across restarts).
The supervisor stops the engine (its application ends) once no attached kernel has lived for the idle timeout, and
removes its directory. Kernels connect to ``sc://localhost:PORT/;token=...;session_id=...``: pyspark's client
sends the token over gRPC local credentials (loopback only) to ``localhost``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("launch_ipykernel")
SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,160}\Z")
POLL = 1.0  # seconds between the supervisor's looks at its kernels and its JVM
STOP_GRACE = 20.0  # seconds the JVM gets to stop its SparkContext before SIGKILL
UI_LINE = re.compile(r"Successfully started service 'SparkUI' on port (\d+)")
APP_LINES = (re.compile(r"Connected to Spark cluster with app ID (\S+)"), re.compile(r"Submitted application (\S+)"))


class EngineError(RuntimeError):
    """The engine cannot be used (the message says why and what to do)."""


def state_root() -> Path:
    """The user's engine directory: created 0700, refused unless it is this user's own real directory."""
    root = Path(os.environ.get("GP_ENGINE_DIR") or f"/tmp/spark_gateway-engines-{os.geteuid()}-{socket.gethostname()}")
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700, parents=True)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise EngineError(f"{root} is not a private directory of uid {os.geteuid()}: remove it or set GP_ENGINE_DIR")
    return root


def engine_dir(key: str) -> Path:
    if not KEY.match(key):
        raise EngineError(f"invalid engine key {key!r}")
    return state_root() / key


def read_state(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / "engine.json").read_text())
    except (OSError, ValueError):
        return {}


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


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


# ------------------------------------------------------------------------------------------------ kernel side


def ensure(key: str, spark_opts: str, idle_timeout: float, level: str) -> Path:
    """The engine of `key` on this host: the running one, or a new supervisor started now (not waited for)."""
    directory = engine_dir(key)
    with os.fdopen(os.open(state_root() / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        deadline = time.monotonic() + 2 * POLL + STOP_GRACE
        while supervisor_alive(state := read_state(directory), key):
            if state.get("state") in ("starting", "ready") and jvm_alive(state):
                return directory
            if time.monotonic() > deadline:
                raise EngineError(f"the engine {key} is ending (state {state.get('state')}): try again shortly")
            time.sleep(0.2)  # its JVM is gone or it is stopping: its supervisor exits within a POLL
        directory.mkdir(mode=0o700, exist_ok=True)
        for sub in ("kernels", "sessions"):
            (directory / sub).mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (directory / "token").unlink()
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
        write_private(directory / "engine.json", json.dumps({"state": "starting", "pid": proc.pid, "level": level}))
        return directory


def attach(directory: Path, kernel_id: str) -> str:
    """Record this process as an attached kernel; its Connect session id (the same after a restart)."""
    write_private(directory / "kernels" / kernel_id, str(os.getpid()))
    path = directory / "sessions" / kernel_id
    try:
        return str(uuid.UUID(path.read_text().strip()))
    except (OSError, ValueError):
        session_id = str(uuid.uuid4())
        write_private(path, session_id)
        return session_id


def detach(directory: Path, kernel_id: str) -> None:
    path = directory / "kernels" / kernel_id
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text()) == os.getpid():
            path.unlink()


def wait_ready(directory: Path, key: str, timeout: float) -> dict[str, Any]:
    """engine.json once the engine accepts clients, with its token; EngineError with the reason otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        state = read_state(directory)
        if state.get("state") == "ready":
            state["token"] = (directory / "token").read_text().strip()
            return state
        if state.get("state") == "failed" or not supervisor_alive(state, key):
            raise EngineError(f"the Spark Connect engine {key} failed: {state.get('error') or log_tail(directory)}")
        if time.monotonic() > deadline:
            raise EngineError(f"the Spark Connect engine {key} was not ready within {timeout:g} s:\n"
                              f"{log_tail(directory)}")  # fmt: skip
        time.sleep(0.2)


def log_tail(directory: Path, lines: int = 12) -> str:
    try:
        text = (directory / "engine.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no engine log)"
    marks = ("Error", "ERROR", "Exception", "error:", "Caused by")
    picked = [line for line in text if any(m in line for m in marks)] or text
    return "\n".join(picked[-lines:])


# ------------------------------------------------------------------------------------------------ engine side


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def attached_kernels(directory: Path) -> list[str]:
    """The ids of attached kernels whose process still lives (files of dead ones are removed)."""
    alive = []
    for path in (directory / "kernels").iterdir():
        try:
            pid = int(path.read_text())
        except (OSError, ValueError):
            continue
        if pid > 1 and pid_alive(pid):
            alive.append(path.name)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return alive


class Supervisor:
    """Runs one engine's JVM and stops it when it has been idle (no attached kernel) for `idle_timeout` s."""

    def __init__(self, key: str, idle_timeout: float, level: str) -> None:
        self.key, self.idle_timeout, self.level = key, idle_timeout, level
        self.directory = engine_dir(key)
        self.state: dict[str, Any] = {"state": "starting", "pid": os.getpid(), "level": level, "key": key}
        self.jvm: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.stopping = False

    def save(self, **fields: Any) -> None:
        self.state.update(fields)
        write_private(self.directory / "engine.json", json.dumps(self.state))

    def start_jvm(self) -> None:
        spark_home = os.environ.get("SPARK_HOME", "")
        submit = Path(spark_home, "bin", "spark-submit")
        if not spark_home or not os.access(submit, os.X_OK):
            raise EngineError(f"SPARK_HOME={spark_home!r} has no bin/spark-submit on {socket.gethostname()}")
        token, port = secrets.token_urlsafe(32), free_port()
        write_private(self.directory / "token", token)
        opts = shlex.split(os.environ.get("SG_ENGINE_SPARK_OPTS", ""))
        argv = [str(submit), "--class", SERVER_CLASS, *opts, "--name", f"sg-engine-{self.key}",
                "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
                "--conf", f"spark.connect.grpc.binding.port={port}"]  # fmt: skip
        env = dict(os.environ, SPARK_CONNECT_AUTHENTICATE_TOKEN=token)
        for name in ("SG_ENGINE_SPARK_OPTS", "PYSPARK_SUBMIT_ARGS", "SPARK_REMOTE", "SPARK_CONNECT_MODE_ENABLED"):
            env.pop(name, None)
        log.info("engine %s (%s level) as %s: %s", self.key, self.level, os.environ.get("USER") or os.geteuid(),
                 shlex.join(argv))  # fmt: skip
        self.jvm = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env)  # fmt: skip
        self.save(port=port, jvm_pid=self.jvm.pid, user=os.environ.get("USER", str(os.geteuid())),
                  host=socket.gethostname(), started=time.time())  # fmt: skip
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

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda s, f: setattr(self, "stopping", True))
        try:
            self.start_jvm()
        except (EngineError, OSError) as exc:
            self.save(state="failed", error=str(exc))
            log.error("engine %s: %s", self.key, exc)
            return 1
        assert self.jvm is not None
        idle_since = time.monotonic()
        while not self.stopping:
            if (status := self.jvm.poll()) is not None:
                errors = [line for line in self.lines if "ERROR" in line or "Exception" in line]
                reason = f"its JVM exited with status {status}" + "".join(f"\n{line}" for line in errors[-8:])
                self.save(state="failed", error=reason)
                log.error("engine %s: %s", self.key, reason)
                return 1
            if self.state["state"] == "starting" and accepts(self.state["port"]):
                self.save(state="ready", ready=time.time())
                log.info("engine %s ready on 127.0.0.1:%s", self.key, self.state["port"])
            if attached_kernels(self.directory):
                idle_since = time.monotonic()
            elif self.idle_timeout > 0 and time.monotonic() - idle_since >= self.idle_timeout:
                log.info("engine %s: no kernel attached for %g s; stopping", self.key, self.idle_timeout)
                break
            time.sleep(POLL)
        self.stop()
        return 0

    def stop(self) -> None:
        """Stop the JVM (its shutdown hook ends the application), then remove the engine's directory."""
        self.save(state="stopping")
        if self.jvm is not None and self.jvm.poll() is None:
            self.jvm.terminate()
            try:
                self.jvm.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.jvm.kill()
                self.jvm.wait()
        for sub in ("kernels", "sessions"):
            for path in (self.directory / sub).glob("*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                (self.directory / sub).rmdir()
        for name in ("token", "engine.json", "engine.log"):
            with contextlib.suppress(OSError):
                (self.directory / name).unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()
        log.info("engine %s stopped", self.key)


# ------------------------------------------------------------------------------------------------ the kernel's session


class ConnectStarter:
    """A connect-mode kernel's `spark` (a Spark Connect session on its engine) and `sql`; the launcher's interface of
    SparkSessionStarter (start, wait, info, install, resolve, objects, real_class, session, state)."""

    names = ("spark", "sql")

    def __init__(self, kernel_id: str, proxy: type) -> None:
        self.kernel_id, self.proxy = kernel_id, proxy
        os.environ["SPARK_CONNECT_MODE_ENABLED"] = "1"  # pyspark.sql.functions (udf, ...) then go to the session
        self.key = os.environ.get("GP_ENGINE_KEY", "")
        self.level = os.environ.get("GP_ENGINE_LEVEL", "kernel")
        self.idle_timeout = float(os.environ.get("GP_ENGINE_IDLE_TIMEOUT") or 600)
        self.start_timeout = float(os.environ.get("GP_ENGINE_START_TIMEOUT") or 300)
        self.state, self.error = "starting", ""
        self.session: Any = None
        self.details: dict[str, Any] = {}
        self.directory: Path | None = None
        self._changed = threading.Condition()
        self._user_ns: dict[str, Any] | None = None
        self._shown = False

    def start(self) -> None:
        with self._changed:
            self.state, self.error, self.session, self._shown = "starting", "", None, False
        threading.Thread(target=self.create, name="spark-connect", daemon=True).start()

    def create(self) -> None:
        """Find or start the engine, attach, open this kernel's session; the outcome is in `state`."""
        began = time.monotonic()
        try:
            if not KEY.match(self.key):
                raise EngineError("GP_ENGINE_KEY is not set: this kernel was not started by a connect-mode kernelspec")
            self.directory = ensure(self.key, os.environ.get("SPARK_OPTS", ""), self.idle_timeout, self.level)
            session_id = attach(self.directory, self.kernel_id)
            log.info("session %s: waiting for engine %s", session_id, self.key)
            atexit.register(detach, self.directory, self.kernel_id)
            engine = wait_ready(self.directory, self.key, self.start_timeout)
            from pyspark.sql.connect.session import SparkSession

            url = f"sc://localhost:{int(engine['port'])}/;token={engine['token']};session_id={session_id}"
            session = SparkSession.builder.remote(url).create()  # never an earlier (dead) engine's session
            details = {
                "connect": True,
                "engine": self.key,
                "share_level": self.level,
                "engine_user": engine.get("user"),
                "host": engine.get("host"),
                "session_id": session_id,
                "app_id": session.conf.get("spark.app.id"),
                "app_name": session.conf.get("spark.app.name"),
                "master": session.conf.get("spark.master"),
                "ui_url": read_state(self.directory).get("ui_url"),
                "spark_version": session.version,
                "engine_pid": engine.get("pid"),
                "seconds": round(time.monotonic() - began, 3),
            }
        except BaseException as exc:  # noqa: BLE001 (reported, never raised)
            self._finish("failed", error=str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}")
            log.error("Spark Connect session could not be created: %s", self.error)
            return
        self._finish("ready", session=session, details=details)
        log.info("Spark Connect session %s on engine %s (%s level, application %s) in %.2f s", session_id, self.key,
                 self.level, details["app_id"], details["seconds"])  # fmt: skip

    def _finish(self, state: str, **fields: Any) -> None:
        with self._changed:
            for name, value in fields.items():
                setattr(self, name, value)
            self.state = state
            self._changed.notify_all()

    def wait(self) -> None:
        with self._changed:
            while self.state == "starting":
                self._changed.wait(0.5)

    def info(self, wait: float = 0.0) -> dict[str, Any]:
        with self._changed:
            if self.state == "starting" and wait > 0:
                self._changed.wait(min(float(wait), 4.0))
            return {"spark": {"state": self.state, "error": self.error or None, **self.details}}

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
        if not jvm_alive(state):
            return f"its JVM (pid {state.get('jvm_pid')}) is no longer running"
        return None

    def install(self, kernel: Any) -> None:
        """`spark` and `sql` (stand-ins until the session exists), `%spark`, an engine check before each cell, and
        an interrupt that cancels this session's operations only."""
        shell = kernel.shell
        self._user_ns = shell.user_ns
        shell.user_ns.update({name: self.proxy(self, name) for name in self.names})
        shell.events.register("pre_run_cell", self._check_engine)
        shell.set_custom_exc((KeyboardInterrupt,), self._on_interrupt)

        def spark(line: str) -> None:
            """%spark: this kernel's Spark Connect session and its engine."""
            if self.state == "starting":
                print(f"Spark Connect engine {self.key} ({self.level} level): starting")
            elif self.state == "failed":
                print(f"Spark Connect engine {self.key} ({self.level} level): failed: {self.error}")
            else:
                print(self.describe())

        shell.register_magic_function(spark, "line", "spark")

    def _check_engine(self, info: Any = None) -> None:
        if (reason := self.engine_gone()) is not None:
            log.warning("engine %s is gone (%s); starting a new one", self.key, reason)
            print(f"The Spark Connect engine {self.key} is gone ({reason}); a new one is starting for `spark`.",
                  file=sys.stderr)  # fmt: skip
            if self._user_ns is not None:
                self._user_ns.update({name: self.proxy(self, name) for name in self.names})
            self.start()

    def _on_interrupt(self, shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> None:
        """KeyboardInterrupt in a cell: interrupt this session's operations on the engine (no other session's)."""
        if self.session is not None:
            try:
                self.session.interruptAll()
            except Exception as exc:  # noqa: BLE001
                log.warning("interrupt: cannot interrupt the Spark Connect operations: %r", exc)
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="spark_gateway Spark Connect engine supervisor")
    parser.add_argument("command", choices=("serve",))
    parser.add_argument("--engine-key", required=True)
    parser.add_argument("--idle-timeout", type=float, default=600.0)
    parser.add_argument("--level", default="user")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s spark_connect %(levelname)s %(message)s")
    return Supervisor(args.engine_key, args.idle_timeout, args.level).run()


if __name__ == "__main__":
    sys.exit(main())
