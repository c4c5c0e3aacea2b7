"""A real Spark standalone cluster for the tests: one Master and two Workers (`spark-class`, no sbin scripts).

In netns mode the cluster runs inside the lab's last host (its network, mount and UTS namespaces), so the other
lab hosts reach the master and executors reach drivers on lab addresses only; in loopback mode it runs on
127.0.0.1. Each worker offers 1 core and 1 GiB, and the master gives an application 1 core unless it asks for
more (`spark.deploy.defaultCores=1`), so two kernels run side by side. `stop()` leaves no JVM behind.

    cluster = SparkCluster.start(lab)      # or the session fixture `spark_cluster`
    cluster.url                            # spark://10.250.0.13:7077
    cluster.app(kernel_id)                 # the master's record of an application (from /json/)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyspark

from testlab.hostlab import HostLab, LabHost

SPARK_HOME = str(Path(pyspark.__file__).resolve().parent)
PYTHON = sys.executable
START_TIMEOUT = 90.0
WORKERS = 2


class SparkClusterError(RuntimeError):
    """The cluster did not come up; the message has the daemons' log tails."""


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def spark_jvms() -> list[tuple[int, str]]:
    """(pid, command line) of every Spark JVM on this machine (any namespace)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if "org.apache.spark" in cmd and "java" in cmd.split(" ", 1)[0]:
                    found.append((int(entry), cmd))
    return found


@dataclass
class SparkCluster:
    """A running standalone cluster (see the module docstring)."""

    address: str
    port: int
    ui_port: int
    dir: Path
    host: LabHost | None = None
    spark_home: str = SPARK_HOME
    workers: int = WORKERS
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"spark://{self.address}:{self.port}"

    @classmethod
    def start(
        cls,
        lab: HostLab | None = None,
        *,
        spark_home: str = SPARK_HOME,
        workers: int = WORKERS,
        netns_ports: tuple[int, int] = (7077, 8080),
    ) -> SparkCluster:
        """`spark_home`: another Spark (e.g. a 3.5 pyspark for Scala kernels); `netns_ports`: master and UI ports
        inside the lab host, so two clusters can share it (loopback mode takes free ports)."""
        host = lab.hosts[-1] if lab is not None and lab.mode == "netns" else None
        address = host.address if host else "127.0.0.1"
        ports = netns_ports if host else (_free_port(address), _free_port(address))
        cluster = cls(address, *ports, Path(tempfile.mkdtemp(prefix="sg-spark-")), host, spark_home, workers)
        try:
            cluster._launch()
            cluster._wait_ready()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _launch(self) -> None:
        prefix = self.host._nsenter() if self.host else []  # noqa: SLF001 (enter the lab host's namespaces)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "SPARK_HOME": self.spark_home,
            "PYSPARK_PYTHON": PYTHON,
            "SPARK_LOCAL_IP": self.address,
            "SPARK_DAEMON_MEMORY": "256m",
            "SPARK_MASTER_OPTS": "-Dspark.deploy.defaultCores=1",
            "SPARK_WORKER_OPTS": "-Dspark.worker.cleanup.enabled=false",
        }
        if "JAVA_HOME" in os.environ:
            env["JAVA_HOME"] = os.environ["JAVA_HOME"]
        spark_class = f"{self.spark_home}/bin/spark-class"
        daemons = [
            ("master", ["org.apache.spark.deploy.master.Master", "--host", self.address, "--port", str(self.port),
                        "--webui-port", str(self.ui_port)]),
        ]  # fmt: skip
        for i in range(1, self.workers + 1):
            work = self.dir / f"worker{i}"
            work.mkdir()
            daemons.append((f"worker{i}", ["org.apache.spark.deploy.worker.Worker", "--host", self.address,
                                           "--cores", "1", "--memory", "1g", "--webui-port", "0",
                                           "--work-dir", str(work), self.url]))  # fmt: skip
        for name, args in daemons:
            with (self.dir / f"{name}.log").open("wb") as log:
                command = [*prefix, spark_class, *args]
                self.procs.append(
                    subprocess.Popen(
                        command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
                    )
                )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise SparkClusterError(f"a Spark daemon exited ({dead[0].returncode}):\n{self.logs()}")
            with contextlib.suppress(OSError, ValueError):
                alive = [w for w in self.state().get("workers", []) if w.get("state") == "ALIVE"]
                if len(alive) == self.workers:
                    return
            time.sleep(0.2)
        raise SparkClusterError(f"{self.workers} workers did not register within {START_TIMEOUT:g} s:\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        parts = []
        for path in sorted(self.dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # ----------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """The master's JSON state: workers, activeapps, completedapps."""
        with urllib.request.urlopen(f"http://{self.address}:{self.ui_port}/json/", timeout=5) as reply:
            return json.loads(reply.read())

    def app(self, name: str) -> dict[str, Any] | None:
        """The master's record of the latest application called `name` (running or completed), else None."""
        state = self.state()
        apps = [a for a in state.get("activeapps", []) + state.get("completedapps", []) if a.get("name") == name]
        return max(apps, key=lambda a: a.get("starttime", 0)) if apps else None

    def executors(self, app_id: str) -> list[int]:
        """Pids of the executor JVMs the workers run for `app_id`."""
        return [pid for pid, cmd in spark_jvms() if "CoarseGrainedExecutorBackend" in cmd and app_id in cmd]

    # ----------------------------------------------------------------- stop
    def stop(self) -> None:
        """Stop the daemons and everything they started (executors); remove the work dir."""
        pids = [p.pid for p in self.procs if p.poll() is None]
        pids += [child for pid in pids for child in _children(pid)]
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
                for proc in self.procs:
                    proc.poll()  # reap our own children
                time.sleep(0.1)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


def spark_distribution(dest: Path) -> Path:
    """A Spark-distribution layout (bin, jars, python/pyspark, python/lib/py4j-*.zip) made of links into pyspark."""
    dest.mkdir(parents=True)
    for name in ("bin", "jars"):
        (dest / name).symlink_to(Path(SPARK_HOME) / name)
    (dest / "python" / "lib").mkdir(parents=True)
    (dest / "python" / "pyspark").symlink_to(SPARK_HOME)
    for archive in (Path(SPARK_HOME) / "python" / "lib").glob("py4j-*.zip"):
        (dest / "python" / "lib" / archive.name).symlink_to(archive)
    return dest


def python_without_pyspark(dest: Path) -> str:
    """A venv with everything this one has (linked) except pyspark and py4j; returns its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    ours = Path(pyspark.__file__).resolve().parent.parent
    (theirs,) = dest.glob("lib/python*/site-packages")
    for entry in ours.iterdir():
        if not entry.name.lower().startswith(("pyspark", "py4j")) and not (theirs / entry.name).exists():
            (theirs / entry.name).symlink_to(entry)
    return str(dest / "bin" / "python")
