"""The ipykernel launcher (run as `launch_ipykernel.py`): start an ipykernel on this host and report its connection
info to the spark_gateway (see docs/design.md). A module, so that its bytecode is cached: a main script is
compiled at every start.

Order: the launch token is read from stdin and handed to the callback helper (start the launcher with `python -s`:
no .pth file of the user's site dir runs before it); the kernel class (and ipykernel) is imported, so that a
broken environment ends the launch before it reports success and the gateway fails the start at once with the log
tail; then ports, connection file, control listener and the callback; only then the user's site dir, IPython's
config and startup files, and the kernel binds (ZMQ clients retry until it does).

With ``--spark-context-initialization-mode eager`` the SparkSession is created before the callback (its JVM boots
and its application starts while ipykernel is imported); with ``lazy`` it is created in the background once the
kernel is initialised. Either way ``spark``, ``sc`` and ``sql`` are in the user namespace
(see ``SparkSessionStarter``). The JVM is started by pyspark from ``PYSPARK_SUBMIT_ARGS`` (set by ``bin/run.sh``
from ``SPARK_OPTS``), split with shlex, no shell.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import site
import sys
import threading
import time
import types
from pathlib import Path
from types import FrameType
from typing import Any

_HERE = Path(__file__).resolve().parent
if not (_HERE / "server_listener.py").exists():  # running from a source checkout
    sys.path.insert(0, str(_HERE.parent.parent / "shared" / "scripts"))

import sg_callback  # noqa: E402
import sg_control  # noqa: E402
import sg_ports  # noqa: E402
import sg_protocol  # noqa: E402
import sg_starter  # noqa: E402
from sg_log import configure_logging  # noqa: E402

log = logging.getLogger("launch_ipykernel")
SPARK_NAMES = ("spark", "sc", "sql")
STOP_TIMEOUT = 10.0  # seconds granted to SparkSession.stop() at exit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="spark_gateway ipykernel launcher")
    parser.add_argument("--kernel-id", required=True)
    parser.add_argument("--port-range", default="0..0")
    parser.add_argument("--response-address", required=True)
    parser.add_argument("--public-key", required=True)
    parser.add_argument("--kernel-class-name", default="ipykernel.ipkernel.IPythonKernel")
    parser.add_argument(
        "--spark-context-initialization-mode", choices=("lazy", "eager", "connect", "none"), default="none"
    )
    parser.add_argument("--engine-share-level", choices=("kernel", "user", "group", "server"), default="user")
    parser.add_argument("--ip", default=os.environ.get("GP_KERNEL_IP", "0.0.0.0"))
    return parser.parse_args(argv)


def connection_file_path(kernel_id: str) -> Path:
    """``sg-kernel-<id>.json`` in $GP_KERNEL_RUNTIME_DIR, else the Jupyter runtime dir."""
    runtime_dir = os.environ.get("GP_KERNEL_RUNTIME_DIR")
    if not runtime_dir:
        from jupyter_core.paths import jupyter_runtime_dir

        runtime_dir = jupyter_runtime_dir()
    path = Path(runtime_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Not `kernel-<id>.json`: that is the gateway's own file for this kernel when both share a filesystem.
    return path / f"sg-kernel-{kernel_id}.json"


def remove_on_exit(path: Path) -> None:
    """Remove ``path`` at interpreter exit and on SIGTERM (which then still terminates the process)."""
    atexit.register(sg_ports.remove_file, str(path))

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        sg_ports.remove_file(str(path))
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def import_kernel_class(name: str) -> type:
    """Import ``package.module.Class`` (an ipykernel Kernel subclass); exit 1 with a clear message if that fails."""
    from ipykernel.kernelbase import Kernel

    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        sys.exit(f"error: cannot import kernel class {name!r}: {exc!r}")
    if not (isinstance(cls, type) and issubclass(cls, Kernel)):
        sys.exit(f"error: kernel class {name!r} is not a subclass of ipykernel.kernelbase.Kernel")
    return cls


# ------------------------------------------------------------------------------------------------ Spark


class SparkSessionError(RuntimeError):
    """The kernel's SparkSession could not be created (the message says why; the kernel log has the rest)."""


def locate_pyspark() -> None:
    """Make pyspark importable: as installed, else from $SPARK_HOME with findspark; exit 1 saying what is missing."""
    if importlib.util.find_spec("pyspark") is not None:  # imported later (in the background when lazy)
        return
    spark_home = os.environ.get("SPARK_HOME", "")
    if not spark_home:
        sys.exit("error: this Python cannot import pyspark and SPARK_HOME is not set: set SPARK_HOME in the "
                 "kernelspec's env to a Spark installation, or install pyspark for PYSPARK_PYTHON")  # fmt: skip
    try:
        import findspark

        findspark.init(spark_home)
        importlib.import_module("pyspark")
    except ImportError as exc:
        sys.exit(f"error: cannot import pyspark from SPARK_HOME={spark_home} ({exc}); install findspark and "
                 f"check that {spark_home}/python holds pyspark and python/lib a py4j zip")  # fmt: skip
    except Exception as exc:  # findspark raises a bare Exception when SPARK_HOME has no py4j
        sys.exit(f"error: SPARK_HOME={spark_home} is not a usable Spark installation: {exc}")


def yarn_tracking_url(sc: Any) -> str | None:
    """The YARN tracking URL (the RM's proxy of the Spark UI) of a YARN application, from the driver's Hadoop
    configuration: http(s)://<RM web address>/proxy/<application id>/."""
    try:
        hadoop = sc._jsc.hadoopConfiguration()
        https = str(hadoop.get("yarn.http.policy") or "") == "HTTPS_ONLY"
        key = "yarn.resourcemanager.webapp.https.address" if https else "yarn.resourcemanager.webapp.address"
        address = str(hadoop.get(key) or "")
    except Exception:  # noqa: BLE001 (informational only)
        return None
    return f"{'https' if https else 'http'}://{address}/proxy/{sc.applicationId}/" if address else None


class _JvmOutput:
    """The JVM's stdout and stderr, copied to the kernel log (not to the notebook); keeps the last lines."""

    def __init__(self, log_fd: int, keep: int = 40) -> None:
        self.log_fd, self.lines = log_fd, collections.deque(maxlen=keep)
        self.read_fd, self.write_fd = os.pipe()
        threading.Thread(target=self._copy, name="jvm-output", daemon=True).start()

    def _copy(self) -> None:
        with os.fdopen(self.read_fd, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                os.write(self.log_fd, line)
                self.lines.append(line.decode(errors="replace").rstrip())

    def errors(self, count: int = 8) -> str:
        """The last lines that look like errors (else the last lines)."""
        marks = ("Error", "ERROR", "Exception", "error:", "Caused by")
        picked = [line for line in self.lines if any(m in line for m in marks)] or list(self.lines)
        return "\n".join(picked[-count:])


class _SparkName:
    """`spark`, `sc` or `sql` until first use: waits for the session, then the real object takes its place.

    Whatever needs no session answers at once: ``isinstance(spark, SparkSession)`` (through ``__class__``, as
    unittest.mock's spec does), ``dir()``, the docstring; everything else waits for the session and goes to it."""

    def __init__(self, starter: SparkSessionStarter, name: str) -> None:
        object.__setattr__(self, "_starter", starter)
        object.__setattr__(self, "_name", name)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        return self._starter.real_class(self._name)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self._starter.real_class(self._name).__doc__

    def _target(self) -> Any:
        return self._starter.resolve(self._name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self._target(), attr, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._target()(*args, **kwargs)

    def __repr__(self) -> str:
        return repr(self._target())

    def __dir__(self) -> list[str]:  # tab completion must not wait for the JVM
        ready = self._starter.session
        return dir(self._starter.objects()[self._name] if ready is not None else self._starter.real_class(self._name))


class SparkSessionStarter(sg_starter.StartState):
    """Creates the kernel's SparkSession (now or in a background thread) and tells the notebook and gateway about it.

    ``state``: ``starting`` -> ``ready`` or ``failed``. The gateway reads ``info()`` through the control listener;
    the notebook sees the application on first use of ``spark``, ``sc`` or ``sql``.
    """

    def __init__(self, log_fd: int) -> None:
        super().__init__()
        self.started = 0.0
        self._jvm = _JvmOutput(log_fd)
        self._thread: threading.Thread | None = None
        self._shown = False
        self._user_ns: dict[str, Any] | None = None
        self._shell: Any = None
        self.jobs: Any = None  # spark_notebook.CellJobs once installed: each cell's job group and progress
        self._awaiting: FrameType | None = None  # the frame that gets the KeyboardInterrupt once the JVM answers
        self._cancelling = False  # this cell's interrupt has cancelled the jobs already
        logging.getLogger("py4j").setLevel(logging.WARNING)  # not one line per py4j connection in the kernel log

    # -- creation
    @staticmethod
    def import_pyspark() -> None:
        """Import what launching the JVM needs, in the calling thread. Eager mode does this before the kernel class's
        imports: done beside them in the session's thread, these imports share the GIL with them and the JVM was
        launched 0.2-1 s later. A failure is left to `create`, which reports it."""
        with contextlib.suppress(Exception):
            importlib.import_module("pyspark.java_gateway")
            importlib.import_module("pyspark.sql")

    def start(self) -> None:
        """Create the session in a background thread."""
        self._thread = threading.Thread(target=self.create, name="spark-session", daemon=True)
        self._thread.start()

    def create(self) -> None:
        """Create the session (blocking); the outcome is in ``state``, never raised."""
        self.started = time.monotonic()
        try:
            from pyspark import SparkContext
            from pyspark.java_gateway import launch_gateway
            from pyspark.sql import SparkSession

            out = {"stdout": self._jvm.write_fd, "stderr": self._jvm.write_fd}
            SparkContext._ensure_initialized(gateway=launch_gateway(popen_kwargs=out))
            session = SparkSession.builder.config("spark.api.mode", "classic").getOrCreate()
            sc = session.sparkContext
            details = {
                "app_id": sc.applicationId,
                "app_name": sc.appName,
                "master": sc.master,
                "ui_url": sc.uiWebUrl,
                "spark_version": sc.version,
                "seconds": round(time.monotonic() - self.started, 3),
            }
            if str(sc.master).startswith("yarn"):
                details["tracking_url"] = yarn_tracking_url(sc)
        except BaseException as exc:  # noqa: BLE001 (reported, never raised: the kernel goes on)
            error = self._explain(exc)
            self._end_jvm()
            self._finish("failed", error=error)
            log.error("SparkSession could not be created: %s", self.error)
            return
        atexit.register(self.stop)
        self._finish("ready", session=session, details=details)
        log.info("SparkSession ready in %.2f s: application %s (%s) on %s, Spark UI %s%s", details["seconds"],
                 details["app_id"], details["app_name"], details["master"], details["ui_url"],
                 f", YARN tracking URL {details['tracking_url']}" if details.get("tracking_url") else "")  # fmt: skip

    def _explain(self, exc: BaseException) -> str:
        java = getattr(exc, "java_exception", None)
        text = str(java.toString()) if java is not None else f"{type(exc).__name__}: {exc}".splitlines()[0]
        if java is None and self._jvm.lines:
            text += f"\nspark-submit said:\n{self._jvm.errors()}"
        return text

    @staticmethod
    def _end_jvm() -> None:
        """Kill the JVM of a failed start (nothing lingers; user code may start a fresh one)."""
        from pyspark import SparkContext

        proc = getattr(SparkContext._gateway, "proc", None)
        SparkContext._gateway = SparkContext._jvm = None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        """Stop the session (ends the application on the cluster), within STOP_TIMEOUT."""
        if self.session is not None:
            log.info("stopping the SparkSession")
            began = time.monotonic()
            stopper = threading.Thread(target=self.session.stop, daemon=True)
            stopper.start()
            stopper.join(STOP_TIMEOUT)
            log.info("SparkSession stopped in %.2f s", time.monotonic() - began)

    # -- notebook side
    def objects(self) -> dict[str, Any]:
        return {"spark": self.session, "sc": self.session.sparkContext, "sql": self.session.sql}

    def real_class(self, name: str) -> type:
        """The class of the object behind a name, without waiting for the session."""
        if self.session is not None:
            return type(self.objects()[name])
        if name == "sql":
            return types.MethodType
        from pyspark import SparkContext
        from pyspark.sql import SparkSession

        return SparkSession if name == "spark" else SparkContext

    def install(self, kernel: Any) -> None:
        """Put `spark`, `sc` and `sql` into the user namespace (the real objects once the session exists, as in eager
        mode), `%spark`, a job group and progress display per cell; cancel the cell's jobs when it is interrupted."""
        import spark_notebook

        shell = self._shell = kernel.shell
        self._user_ns = shell.user_ns
        if self.session is not None:
            shell.user_ns.update(self.objects())
            shell.events.register("pre_run_cell", self._announce_once)
        else:
            shell.user_ns.update({name: _SparkName(self, name) for name in SPARK_NAMES})
        self.jobs = spark_notebook.CellJobs(self, kernel, spark_notebook.progress_enabled())
        self.jobs.install(shell)
        spark_notebook.install_magic(shell, self, self.jobs)
        shell.set_custom_exc((KeyboardInterrupt,), self._on_interrupt)
        hook = kernel.pre_handler_hook  # ipykernel makes SIGINT raise KeyboardInterrupt while a message is handled

        def pre_handler_hook() -> None:
            hook()
            self._cancelling = False
            signal.signal(signal.SIGINT, self._on_sigint)

        kernel.pre_handler_hook = pre_handler_hook

    def _announce(self) -> None:
        if not self._shown:
            self._shown = True
            d = self.details
            yarn = f"; YARN tracking URL: {d['tracking_url']}" if d.get("tracking_url") else ""
            print(f"Spark application {d['app_id']} ({d['app_name']}) on {d['master']}; Spark UI: {d['ui_url']}{yarn}")

    def _announce_once(self, info: Any = None) -> None:
        """Eager mode: the first cell says which application this kernel is."""
        self._announce()
        self._shell.events.unregister("pre_run_cell", self._announce_once)

    def resolve(self, name: str) -> Any:
        """The real object behind a name: waits for the session, shows the application once, replaces the names."""
        self.wait()
        if self.state == "failed":
            raise SparkSessionError(f"the SparkSession could not be created: {self.error}")
        objects = self.objects()
        if not self._shown:
            self._announce()
            for key, proxy in list((self._user_ns or {}).items()):
                if key in objects and type(proxy) is _SparkName:
                    self._user_ns[key] = objects[key]  # type: ignore[index]
        if self.jobs is not None:
            self.jobs.bind()  # the running cell's jobs from now on are in its group
        return objects[name]

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        """SIGINT while a cell runs. A cell waiting for the JVM gets its KeyboardInterrupt once the JVM answers,
        after its jobs are cancelled from another thread: raised inside py4j's socket read, py4j tears its
        connections down, and the cell's next JVM call can then fail (Py4JNetworkError). A second SIGINT before
        the answer (a JVM call that is no Spark job) raises at once."""
        caller = _py4j_caller(frame)
        if self._awaiting is not None or caller is None or self.session is None or sys.gettrace() is not None:
            self._end_await()
            raise KeyboardInterrupt
        self._awaiting, self._cancelling = caller, True
        threading.Thread(target=self.cancel_jobs, name="spark-interrupt", daemon=True).start()
        caller.f_trace = self._raise_interrupt  # its next event comes once py4j has read the JVM's answer
        sys.settrace(_trace_nothing)  # a frame's f_trace only runs while its thread has a trace function

    def _raise_interrupt(self, frame: FrameType, event: str, arg: Any) -> None:
        self._end_await()
        raise KeyboardInterrupt

    def _end_await(self) -> None:
        if self._awaiting is not None:
            self._awaiting.f_trace = None
            self._awaiting = None
            sys.settrace(None)

    def cancel_jobs(self) -> None:
        """Cancel the running cell's Spark jobs (needs a py4j connection of its own: not the signalled main thread)."""
        try:
            if self.jobs is not None:
                self.jobs.cancel()
            else:
                self.session.sparkContext.cancelAllJobs()
        except Exception as exc:
            log.warning("interrupt: cannot cancel Spark jobs: %r", exc)

    def _on_interrupt(self, shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> None:
        """IPython's handler of KeyboardInterrupt in a cell: cancel the running Spark jobs, show the traceback."""
        if self.session is not None and not self._cancelling:
            self.cancel_jobs()
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset)


def _py4j_caller(frame: FrameType | None) -> FrameType | None:
    """The frame that called py4j's ``send_command`` if `frame` runs inside it (the thread waits for the JVM)."""
    caller = None
    while frame is not None:
        if frame.f_code.co_name == "send_command" and frame.f_globals.get("__name__", "").startswith("py4j."):
            caller = frame.f_back
        frame = frame.f_back
    return caller


def _trace_nothing(frame: FrameType, event: str, arg: Any) -> None:
    """The thread's trace function while an interrupt waits for the JVM: new frames are not traced."""


def hand_over_ports(
    app: Any, reservation: sg_ports.PortReservation, info: dict[str, Any], bound: threading.Event
) -> None:
    """Release each reserved port the moment ipykernel binds it, so no other process can take it in between; set
    `bound` once the kernel's sockets are bound (the control op `ready` waits for it)."""
    bind = getattr(app, "_try_bind_socket", None)
    if bind is None:  # an ipykernel without that hook: release everything now
        reservation.release()
        return

    def release_then_bind(sock: Any, port: int) -> Any:
        reservation.release(port)
        if port == info["iopub_port"]:  # ipykernel binds shell, stdin, control, iopub, then the heartbeat's own
            reservation.release(info["hb_port"])
        result = bind(sock, port)
        if port == info["iopub_port"]:
            bound.set()
        return result

    app._try_bind_socket = release_then_bind


def warn_if_user_site_ran() -> None:
    """Say so when the user's site dir was active at start-up (the interpreter was not started with -s): its .pth
    files and usercustomize ran before the callback, where they could forge it."""
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        log.warning(
            "warning: %s is started without -s, so the user's site dir %s ran before the callback: start it with"
            " `python -s` (the shipped kernelspecs do; the launcher adds the user's site dir after the callback)",
            sys.executable, site.getusersitepackages(),
        )  # fmt: skip


def enable_user_site() -> None:
    """Add the user's site dir that `python -s` held back (its .pth files, usercustomize), now that the callback
    is sent, where Python would have put it: before the installation's own site-packages."""
    if not sys.flags.no_user_site or sys.flags.no_site or os.environ.get("PYTHONNOUSERSITE") or site.ENABLE_USER_SITE:
        return  # nothing held back (or already active), or the operator's choice (-S, PYTHONNOUSERSITE)
    if os.getuid() != os.geteuid() or os.getgid() != os.getegid() or not _venv_allows_user_site():
        return  # Python itself would not enable it
    site.ENABLE_USER_SITE = True
    before = list(sys.path)
    site.addusersitepackages(None)
    added = [entry for entry in sys.path if entry not in before]
    system = [i for i, entry in enumerate(before) if entry in set(site.getsitepackages())]
    if added and system:
        sys.path[:] = before[: system[0]] + added + before[system[0] :]
    try:
        import usercustomize  # noqa: F401
    except ImportError as exc:
        if exc.name != "usercustomize":
            raise


def _venv_allows_user_site() -> bool:
    """False in a virtual environment without system site-packages (Python disables the user site there)."""
    if sys.prefix == sys.base_prefix:
        return True
    cfg = Path(sys.executable).parent.parent / "pyvenv.cfg"
    if not cfg.is_file():
        cfg = Path(sys.executable).parent / "pyvenv.cfg"
    try:
        lines = cfg.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip().lower() == "include-system-site-packages":
            return value.strip().lower() == "true"
    return False


def log_stream_fd() -> int:
    """A duplicate of the launcher's stderr (the kernel log) that ipykernel's capture of fd 2 does not touch."""
    return os.dup(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    token = sg_callback.take_launch_token()  # from stdin, before anything of the user's can run
    configure_logging("launch_ipykernel", "py4j")
    warn_if_user_site_ran()
    # before any thread; the helper alone keeps the token (our copy is wiped)
    sender = sg_callback.CallbackSender(args.response_address, args.public_key, args.kernel_id, token)
    mode = args.spark_context_initialization_mode

    spark: Any = None
    if mode == "connect":  # a Spark Connect session on a shared engine (spark_connect.py), always started lazily
        import spark_connect

        locate_pyspark()
        spark = spark_connect.ConnectStarter(args.kernel_id, _SparkName)
    elif mode != "none":
        locate_pyspark()
        spark = SparkSessionStarter(log_stream_fd())
        if mode == "eager":
            spark.import_pyspark()
            spark.start()  # the JVM boots while ipykernel is imported

    # Import errors and bad kernel classes must kill the launch before it reports success: the gateway then
    # fails the start at once with this process's exit status and log tail.
    kernel_class = import_kernel_class(args.kernel_class_name)
    from ipykernel.kernelapp import IPKernelApp

    if spark is not None and mode == "eager":
        spark.wait()
        if spark.state == "failed":
            sys.exit(f"error: cannot create the SparkSession (eager mode): {spark.error}")

    pid, pgid = os.getpid(), os.getpgid(0)
    reservation = sg_ports.PortReservation(args.port_range, len(sg_protocol.PORT_NAMES) + 1, args.ip)
    ports = reservation.ports
    info = sg_ports.build_connection_info(ports[:-1], args.ip)
    path = connection_file_path(args.kernel_id)
    remove_on_exit(path)
    sg_ports.write_connection_file(str(path), info)
    reservation.release(ports[-1])
    bound = threading.Event()  # the kernel's sockets are bound: clients connect at their first attempt
    listener = sg_control.ControlListener(
        pid, pgid, port=ports[-1], ip=args.ip, info=spark.info if spark else None, ready=bound.wait
    )
    listener.start()

    # The callback goes before any file of the user can run (IPython's config and startup files, extensions, the
    # user site's .pth files): none of them ever sees a pending launch. The kernel binds right after; the gateway
    # waits for that (control op `ready`) before it hands the kernel to its clients, so they connect at their first
    # attempt; a kernel that cannot bind dies, and is then found dead like any other.
    fields = sg_callback.payload_fields(args.kernel_id, info, pid, pgid, listener, str(path))
    try:
        sender.send(fields)
    except sg_callback.CallbackError as exc:
        log.error("error: %s", exc)
        sys.exit(1)
    enable_user_site()

    # The app ignores SIGINT except while a cell runs, where SIGINT raises KeyboardInterrupt.
    app = IPKernelApp.instance(kernel_class=kernel_class)
    hand_over_ports(app, reservation, info, bound)
    app.initialize(["-f", str(path)])
    reservation.release()
    bound.set()  # an ipykernel without the binding hook: bound by now
    if spark is not None:
        spark.install(app.kernel)
        if mode in ("lazy", "connect"):
            spark.start()  # after the kernel's own start-up, so the JVM does not compete with it
    app.start()
    log.info("kernel stopped")
    exit_now()


def exit_now() -> None:
    """Exit once the kernel stopped: the atexit work runs (connection file, SparkSession, IPython's history), the
    interpreter's own teardown (~0.3-0.8 s of unloading modules, more on a busy host) is skipped, so the kernel's
    process is gone within a few tens of ms of its shutdown reply and a mass shutdown frees its hosts sooner."""
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):  # closed or replaced streams: nothing left to flush
            stream.flush()
    os._exit(0)
