"""`check` and `sync`: kernelspecs on the hosts that run their kernels, over the provisioner's pooled SSH connections.

A spec must exist on every one of its remote hosts at the same path with the same content; `sync` copies it there
over SFTP (staged beside the destination, then renamed into place) and `check` proves that a kernel could start:
login, spec content, interpreter, spark-submit, a connection back to the gateway and a usable kernel port.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import secrets
import shlex
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from . import engines, yarn
from .config import parse_port_range
from .hosts import Host
from .spark import spec_master
from .specs import manifest
from .ssh import SshError, SshPool, close_quietly

CHECKS = ("ssh", "spec", "interpreter", "spark-submit", "callback", "ports")
MANIFEST = (
    "cd -- {dir} 2>/dev/null || exit 3; "
    "find -L . \\( -name __pycache__ -o -name '*.pyc' \\) -prune -o -type f -exec sha256sum -- {{}} + "
    "&& echo --- && find -L . \\( -name __pycache__ -o -name '*.pyc' \\) -prune -o -type f -perm -u=x -print"
)
PYTHON_PROBE = "import sys, ipykernel, Crypto; print(sys.version.split()[0], ipykernel.__version__)"
R_PROBE = 'if (!requireNamespace("IRkernel", quietly = TRUE)) quit(status = 4)'
CONNECT_PROBE = (
    "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[4])); "
    "s.sendall(sys.argv[3].encode()); s.close()"
)
PORT_PROBE = """\
import random, socket, sys
lower, upper, token, wait = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
for port in [0] if upper == 0 else random.sample(range(lower, upper + 1), min(100, upper - lower + 1)):
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", port))
        break
    except OSError:
        s.close()
else:
    print("none", flush=True)
    sys.exit(2)
s.listen(1)
s.settimeout(wait)
print(s.getsockname()[1], flush=True)
try:
    conn, _ = s.accept()
    conn.settimeout(wait)
    print("ok" if conn.recv(64) == token else "bad token", flush=True)
except OSError as exc:
    print("no connection:", exc, flush=True)
"""


@dataclass
class Outcome:
    """One cell of the check table."""

    status: str  # ok, FAIL, skip or n/a
    detail: str = ""
    fix: str = ""


def ok(detail: str = "") -> Outcome:
    return Outcome("ok", detail)


def fail(detail: str, fix: str = "") -> Outcome:
    return Outcome("FAIL", detail, fix)


@dataclass
class Spec:
    """An installed kernelspec and the hosts its kernels may run on."""

    name: str
    path: Path
    data: dict[str, Any]
    hosts: list[str]
    port_range: str

    @property
    def env(self) -> dict[str, str]:
        return {k: str(v) for k, v in (self.data.get("env") or {}).items()}

    @property
    def language(self) -> str:
        return str(self.data.get("language", "")).lower()

    @property
    def interpreter(self) -> str:
        """The interpreter the kernel runs in: PYSPARK_PYTHON or GP_RSCRIPT for Spark specs, argv[0] otherwise;
        none for Scala (a JVM that spark-submit starts)."""
        spark = str(self.data["argv"][0]).endswith(".sh")
        if self.language == "python":
            return self.env.get("PYSPARK_PYTHON") or str(self.data["argv"][0])
        if self.language == "r":
            return self.env.get("GP_RSCRIPT", "Rscript") if spark else str(self.data["argv"][0])
        return ""

    @property
    def probe_python(self) -> str:
        """A Python on the host for the network probes: the kernel's own, the listener's (R), else python3."""
        if self.language == "python":
            return self.interpreter
        return self.env.get("GP_LISTENER_PYTHON") or "python3"


@dataclass
class Settings:
    """What `check` and `sync` need besides the specs."""

    pool: SshPool
    response_ip: str = ""
    response_port: int = 8877
    timeout: float = 10.0
    _listeners: dict[str, _Listener] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def listener(self, address: str) -> _Listener:
        with self._lock:
            if address not in self._listeners:
                self._listeners[address] = _Listener(address, self.response_port)
            return self._listeners[address]

    def close(self) -> None:
        for listener in self._listeners.values():
            listener.close()
        self.pool.close()


class _Listener:
    """Stands in for the gateway's response server: accepts connections and records the tokens hosts send."""

    def __init__(self, address: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            self.sock = socket.create_server((address, port), family=family)
        except OSError:  # the gateway itself (or another check) holds the response port
            self.sock = socket.create_server((address, 0), family=family)
        self.address, self.port = address, self.sock.getsockname()[1]
        self.tokens: set[bytes] = set()
        self.cond = threading.Condition()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    data = conn.recv(64)
                except OSError:
                    continue
            with self.cond:
                self.tokens.add(data)
                self.cond.notify_all()

    def received(self, token: str, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: token.encode() in self.tokens, timeout)

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------------------------ manifests
def remote_manifest(host: Host, path: Path) -> dict[str, tuple[str, bool]] | None:
    """What `specs.manifest` would say on the host, or None when the directory is not there."""
    res = host.run(MANIFEST.format(dir=shlex.quote(str(path))))
    if res.status == 3:
        return None
    if res.status != 0:
        raise SshError(f"cannot list {path} on {host.entry}: {res.stderr.strip() or f'exit {res.status}'}")
    sums, _, executables = res.stdout.partition("---\n")
    execs = {line[2:] for line in executables.splitlines() if line.startswith("./")}
    result = {}
    for line in sums.splitlines():
        digest, _, name = line.partition("  ")
        if name.startswith("./"):
            result[name[2:]] = (digest, name[2:] in execs)
    return result


def describe_difference(local: dict[str, tuple[str, bool]], remote: dict[str, tuple[str, bool]]) -> str:
    """What differs between two manifests, naming a few files of each kind."""

    def some(names: set[str]) -> str:
        ordered = sorted(names)
        return ", ".join(ordered[:4]) + (f" and {len(ordered) - 4} more" if len(ordered) > 4 else "")

    both = set(local) & set(remote)
    kinds = {
        "missing there": set(local) - set(remote),
        "different content": {n for n in both if local[n][0] != remote[n][0]},
        "different mode": {n for n in both if local[n][0] == remote[n][0] and local[n][1] != remote[n][1]},
        "only there": set(remote) - set(local),
    }
    parts = [f"{label}: {some(names)}" for label, names in kinds.items() if names]
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ check
def _check_spec(host: Host, spec: Spec) -> Outcome:
    if host.local:
        return ok("this machine's own copy")
    fix = f"jupyter ssh-spec sync {spec.name}"
    remote = remote_manifest(host, spec.path)
    if remote is None:
        return fail(f"{spec.path} does not exist on {host.entry}", fix)
    local = manifest(spec.path)
    if remote != local:
        return fail(f"{spec.path} on {host.entry} differs ({describe_difference(local, remote)})", fix)
    return ok(f"identical, {len(local)} files")


def _check_interpreter(host: Host, spec: Spec) -> Outcome:
    """The kernel's interpreter (Python, Rscript) loads the kernel; R and Scala: the listener's Python has what the
    protocol needs."""
    path, detail = spec.interpreter, ""
    if path:
        q = shlex.quote(path)
        if spec.language == "python":
            res = host.run(f"test -x {q} || exit 127; exec {q} -c {shlex.quote(PYTHON_PROBE)}")
            install = f"{path} -m pip install ipykernel pycryptodome"
        else:
            res = host.run(f"command -v {q} >/dev/null || exit 127; exec {q} -e {shlex.quote(R_PROBE)}")
            install = f"{path} -e 'install.packages(\"IRkernel\")' (Debian: apt install r-cran-irkernel)"
        if res.status == 127:
            return fail(
                f"{path} does not exist on {host.entry} (or is not executable)",
                "install it there at that path, or reinstall the spec with --interpreter set to a path every host has",
            )
        if res.status != 0:
            last = (res.stderr.strip().splitlines() or [f"exit {res.status}"])[-1]
            return fail(f"{path} on {host.entry} cannot load the kernel: {last}", f"on {host.entry}: {install}")
        detail = res.stdout.strip() or path
    listener = spec.env.get("GP_LISTENER_PYTHON")
    if spec.language != "python" and listener:  # R, Scala: the protocol runs in server_listener.py under this Python
        q = shlex.quote(listener)
        if host.run(f"test -x {q} && exec {q} -c 'import Crypto.Cipher.AES'").status != 0:
            return fail(
                f"the listener's Python {listener} on {host.entry} is missing or lacks pycryptodome",
                f"on {host.entry}: {listener} -m pip install pycryptodome (or set GP_LISTENER_PYTHON in the spec)",
            )
        detail = f"{detail}; listener {listener}" if detail else f"listener {listener}"
    return ok(detail) if detail else Outcome("n/a", "runs through spark-submit")


def _check_spark_submit(host: Host, spec: Spec) -> Outcome:
    """spark-submit exists; R: SparkR is installed beside it; Scala: its Spark uses the Scala Toree is built for."""
    home = spec.env.get("SPARK_HOME")
    if not home:
        return Outcome("n/a", "not a Spark spec")
    home = home.rstrip("/")
    submit = f"{home}/bin/spark-submit"
    reinstall = "or reinstall the spec with --spark-home set to where such a Spark is on every host"
    if host.run(f"test -x {shlex.quote(submit)}").status != 0:
        return fail(f"{submit} is missing on {host.entry} (or not executable)", f"install Spark at {home}, {reinstall}")
    if spec.language == "r" and host.run(f"test -f {shlex.quote(home)}/R/lib/SparkR/DESCRIPTION").status != 0:
        return fail(
            f"SparkR is not installed under {home}/R/lib on {host.entry} (pip's pyspark has none)",
            f"install a Spark distribution with R support at {home} (spark.apache.org's spark-<version>-bin-*.tgz "
            f"ships R/lib/SparkR), {reinstall}; see docs/r-kernels.md",
        )
    if spec.language == "scala":
        jars = host.run(f"cd {shlex.quote(home)}/jars 2>/dev/null && ls -1 scala-library-*.jar").stdout.split()
        if jars and not jars[0].startswith("scala-library-2.12."):
            return fail(
                f"the Spark at {home} on {host.entry} uses Scala {jars[0][14:-4]} ({jars[0]}); Apache Toree 0.5 "
                "needs Scala 2.12, i.e. Spark 3.x",
                f"install a Spark 3.x at {home}, {reinstall}; see docs/scala-kernels.md",
            )
        return ok(f"{submit} ({jars[0] if jars else 'Scala version unknown'})")
    if spec_master(spec.env.get("SPARK_OPTS", "")) == "yarn":
        return _check_yarn(host, spec, submit)
    argv = [str(a) for a in spec.data.get("argv", [])]
    if "connect" in argv and (problem := engines.check_connect(host.run, home, spec.interpreter)):
        return fail(*problem)
    return ok(submit)


def _check_yarn(host: Host, spec: Spec, submit: str) -> Outcome:
    """YARN specs: the Hadoop configuration on the host, its ResourceManager answering there, the spec's queue."""
    conf = spec.env.get("YARN_CONF_DIR") or spec.env.get("HADOOP_CONF_DIR")
    if not conf:
        return fail(
            f"{spec.path}/kernel.json sets no HADOOP_CONF_DIR: spark-submit cannot find the ResourceManager",
            "reinstall the spec with --hadoop-conf-dir DIR (the Hadoop client configuration on every host)",
        )
    queue = yarn.spec_queue(spec.env.get("SPARK_OPTS", ""))
    script = inspect.getsource(yarn) + "\nimport json, sys\nprint(json.dumps(probe(sys.argv[1], sys.argv[2])))\n"
    res = host.run(shlex.join([spec.probe_python, "-", conf, queue]), stdin=script.encode(), timeout=30.0)
    try:
        passed, detail, fix = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        last = (res.stderr.strip().splitlines() or [f"exit {res.status}"])[-1]
        return fail(f"the YARN probe did not run on {host.entry} ({spec.probe_python}): {last}", "see the interpreter")
    return ok(f"{submit}; {detail}") if passed else fail(f"on {host.entry}: {detail}", fix)


def _check_callback(host: Host, spec: Spec, settings: Settings) -> Outcome:
    try:
        address = settings.response_ip or host.gateway_address()
        if not address:
            raise SshError(f"cannot tell which address {host.entry} reaches this machine at (ProxyJump?)")
        listener = settings.listener(address)
    except OSError as exc:
        return fail(
            f"cannot listen on {settings.response_ip or 'the gateway address'}: {exc.strerror or exc}",
            "set GP_RESPONSE_IP (--response-ip) to an address of this machine that the hosts can reach",
        )
    token = secrets.token_hex(16)
    args = [listener.address, str(listener.port), token, str(settings.timeout / 2)]
    command = shlex.join([spec.probe_python, "-c", CONNECT_PROBE, *args])
    res = host.run(command, timeout=settings.timeout)
    if res.status == 0 and listener.received(token, 2.0):
        return ok(f"reached {listener.address}:{listener.port}")
    last = (res.stderr.strip().splitlines() or [f"exit {res.status}"])[-1]
    return fail(
        f"{host.entry} cannot connect to this gateway at {listener.address}:{listener.port}: {last}",
        "let the host reach the gateway's response port (GP_RESPONSE_PORT) through any firewall, "
        "or set GP_RESPONSE_IP to an address of the gateway that the host can reach",
    )


def _check_ports(host: Host, spec: Spec, settings: Settings) -> Outcome:
    try:
        lower, upper = parse_port_range(spec.port_range)
    except ValueError as exc:
        return fail(str(exc), f"fix port_range in metadata.kernel_provisioner.config of {spec.path}/kernel.json")
    token = secrets.token_hex(16)
    args = [str(lower), str(upper), token, str(settings.timeout / 2)]
    command = shlex.join([spec.probe_python, "-", *args])
    lines = host.stream(command, PORT_PROBE.encode(), settings.timeout)
    first = next(lines, "").strip()
    if first == "none":
        return fail(f"no free port in {spec.port_range} on {host.entry}", "choose a port_range with free ports")
    if not first.isdigit():
        return fail(f"the port probe did not start on {host.entry} ({spec.probe_python})", "see the interpreter check")
    port = int(first)
    where = f"{host.address()}:{port}"
    try:
        with socket.create_connection((host.address(), port), timeout=settings.timeout / 2) as sock:
            sock.sendall(token.encode())
    except OSError as exc:
        lines.close()
        return fail(
            f"this gateway cannot connect to {where} (a kernel port on {host.entry}): {exc.strerror or exc}",
            f"let the gateway reach ports {spec.port_range if upper else '(any)'} on {host.entry} through any "
            "firewall, or set a port_range that is open",
        )
    result = next(lines, "").strip()
    lines.close()
    if result != "ok":
        return fail(f"kernel port {where}: {result or 'no answer'}")
    return ok(f"{where} reachable" + (f" (range {spec.port_range})" if upper else ""))


def check_host(host: Host, spec: Spec, settings: Settings) -> dict[str, Outcome]:
    """Every check of one spec on one host; after a failed login the rest are skipped."""
    results: dict[str, Outcome] = {}
    try:
        results["ssh"] = ok(host.connect())
    except SshError as exc:
        results["ssh"] = fail(str(exc))
        return results | {name: Outcome("skip", "no SSH") for name in CHECKS[1:]}
    steps: list[tuple[str, Callable[[], Outcome]]] = [
        ("spec", lambda: _check_spec(host, spec)),
        ("interpreter", lambda: _check_interpreter(host, spec)),
        ("spark-submit", lambda: _check_spark_submit(host, spec)),
        ("callback", lambda: _check_callback(host, spec, settings)),
        ("ports", lambda: _check_ports(host, spec, settings)),
    ]
    for name, step in steps:
        if name in ("callback", "ports") and spec.language == "python" and results["interpreter"].status == "FAIL":
            results[name] = Outcome("skip", "the kernel's Python is unusable")
            continue
        try:
            results[name] = step()
        except (SshError, OSError, EOFError, paramiko.SSHException) as exc:
            results[name] = fail(f"{type(exc).__name__}: {exc}")
    return results


def check(specs: list[Spec], settings: Settings, out: Callable[[str], None] = print) -> bool:
    """Check every host of every spec (concurrently) and print one table per spec; True when all passed."""
    jobs = [(spec, entry) for spec in specs for entry in spec.hosts]
    with ThreadPoolExecutor(max_workers=16) as executor:
        results = list(executor.map(lambda job: check_host(Host(job[1], settings.pool), job[0], settings), jobs))
    by_spec: dict[str, dict[str, dict[str, Outcome]]] = {}
    for (spec, entry), result in zip(jobs, results, strict=True):
        by_spec.setdefault(spec.name, {})[entry] = result
    passed = True
    for spec in specs:
        table = by_spec.get(spec.name, {})
        out(render_table(spec, table))
        passed = passed and all(o.status != "FAIL" for r in table.values() for o in r.values())
    return passed


def render_table(spec: Spec, table: dict[str, dict[str, Outcome]]) -> str:
    rows = [["host", *CHECKS]] + [[entry, *(r[c].status for c in CHECKS)] for entry, r in table.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"{spec.name}: {spec.path}"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for entry, result in table.items():
        for name in CHECKS:
            outcome = result[name]
            if outcome.status == "FAIL":
                lines.append(f"  {entry} {name}: {outcome.detail}")
                if outcome.fix:
                    lines.append(f"      fix: {outcome.fix}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ sync
def _upload(host: Host, src: Path) -> None:
    """Copy `src` to the same path on the host: staged beside it, then renamed into place over SFTP."""
    dest = str(src)
    parent = str(src.parent)
    res = host.run(f"mkdir -p -- {shlex.quote(parent)}")
    if res.status != 0:
        raise SshError(f"cannot create {parent} on {host.entry}: {res.stderr.strip()}")
    box = f"{parent}/.{src.name}.partial-{secrets.token_hex(4)}"
    try:
        sftp = host.pool.client(host.entry).open_sftp()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise SshError(f"cannot open SFTP to {host.entry}: {exc or type(exc).__name__}") from exc
    try:
        _sftp_swap(sftp, src, box)
    except PermissionError as exc:
        raise SshError(
            f"cannot write {dest} on {host.entry}: {exc.strerror or exc}. Sync as a user who may write there "
            "(--remote-user, or User in ssh_config)"
        ) from exc
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise SshError(f"cannot write {dest} on {host.entry}: {exc or type(exc).__name__}") from exc
    finally:
        close_quietly(sftp.get_channel())
        host.run(f"rm -rf -- {shlex.quote(box)}")


def _sftp_swap(sftp: paramiko.SFTPClient, src: Path, box: str) -> None:
    """Upload `src` into `box`/new, then rename it to `src`'s path (the old copy goes to `box`/old)."""
    dest, new, old = str(src), f"{box}/new", f"{box}/old"
    files = manifest(src)
    sftp.mkdir(box, 0o700)
    sftp.mkdir(new, 0o755)
    for rel in sorted({str(p) for f in files for p in Path(f).parents} - {"."}, key=lambda p: p.count("/")):
        sftp.mkdir(f"{new}/{rel}", 0o755)
    for rel in files:
        sftp.put(str(src / rel), f"{new}/{rel}")
        sftp.chmod(f"{new}/{rel}", (src / rel).stat().st_mode & 0o777)
    with contextlib.suppress(FileNotFoundError):
        sftp.posix_rename(dest, old)
    try:
        sftp.posix_rename(new, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            sftp.posix_rename(old, dest)
        raise


def sync_host(host: Host, spec: Spec, out: Callable[[str], None]) -> bool:
    """Bring one host's copy of one spec up to date; reports progress through `out`."""
    tag = f"{host.entry}: {spec.name}:"
    if host.local:
        out(f"{tag} this machine, nothing to copy")
        return True
    try:
        host.connect()
        local = manifest(spec.path)
        remote = remote_manifest(host, spec.path)
        if remote == local:
            out(f"{tag} up to date")
            return True
        size = sum((spec.path / rel).stat().st_size for rel in local)
        why = "missing there" if remote is None else describe_difference(local, remote)
        out(f"{tag} copying {len(local)} files ({size / 1024:.1f} KiB) to {spec.path} ({why})")
        started = time.monotonic()
        _upload(host, spec.path)
        out(f"{tag} done in {time.monotonic() - started:.2f} s{_precompile(host, spec)}")
        return True
    except (SshError, OSError, EOFError, paramiko.SSHException) as exc:
        out(f"{tag} FAILED: {exc}")
        return False


def _precompile(host: Host, spec: Spec) -> str:
    """Compile the launcher scripts on the host with the Python that runs them: kernels of impersonated users
    cannot write `__pycache__` in the spec and would otherwise compile them at every launch. '' when done, else
    why not (the spec works either way)."""
    scripts = spec.path / "scripts"
    res = host.run(f"{shlex.quote(spec.probe_python)} -m compileall -q {shlex.quote(str(scripts))}")
    if res.status == 0:
        return ""
    return f" (scripts not precompiled: {(res.stdout + res.stderr).strip()[-200:] or f'exit {res.status}'})"


def sync(specs: list[Spec], settings: Settings, out: Callable[[str], None] = print) -> bool:
    """Copy every spec to every one of its hosts (concurrently); True when every host has it now."""
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            out(line)

    jobs = [(spec, entry) for spec in specs for entry in spec.hosts]
    with ThreadPoolExecutor(max_workers=16) as executor:
        done = list(executor.map(lambda job: sync_host(Host(job[1], settings.pool), job[0], say), jobs))
    return all(done)
