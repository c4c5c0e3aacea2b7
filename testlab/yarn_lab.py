"""A real Hadoop YARN 3.5.0 cluster for the tests: a ResourceManager daemon and a NodeManager on each of two hosts.

The jars come from testlab/yarn/pom.xml (`make yarn-lab` copies them into `~/.cache/spark_gateway/yarn-3.5.0/jars`;
the shaded `hadoop-client-minicluster` holds the ResourceManager and NodeManager classes). In netns mode the
ResourceManager runs inside the lab's last host and a NodeManager inside each of the first two, each in its host's
network, mount, UTS and PID namespaces, so ApplicationMasters and executors run in NodeManager containers on
cluster hosts as in production; in loopback mode all daemons run on 127.0.0.1 (one NodeManager).

Sized for a 2-core machine: each NodeManager declares 8 GiB and 8 vcores (memory and CPU are not enforced:
vmem/pmem checks off), the disk health checker accepts full disks, and the capacity scheduler lets AMs use the
whole queue. Queues: `default` and `q1`. No account holds a `hadoop.proxyuser.*` right: impersonated kernels run
as their user (sudo) and need none. Staging is on the local filesystem (`file:///`), which all lab hosts share.

    yarn = YarnLab.start(lab)        # or the session fixture `yarn_lab`
    yarn.conf_dir                    # HADOOP_CONF_DIR / YARN_CONF_DIR for clients (kernels, spark-submit)
    yarn.apps(tag=kernel_id)         # the RM's records (GET /ws/v1/cluster/apps)
    yarn.stop()                      # no daemon, container or JVM left
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from testlab.hostlab import HostLab, LabHost
from testlab.spark_cluster import _children

VERSION = "3.5.0"
START_TIMEOUT = 120.0
RM_PORT = 8032
RM_WEB_PORT = 8088
QUEUES = ("default", "q1")
DAEMON_HEAP = "-Xmx256m"


def jars_dir() -> Path:
    """Where `make yarn-lab` puts the jars (SG_YARN_JARS overrides)."""
    default = Path.home() / ".cache" / "spark_gateway" / f"yarn-{VERSION}" / "jars"
    return Path(os.environ.get("SG_YARN_JARS", default))


def site_xml(props: dict[str, str]) -> str:
    """A Hadoop `*-site.xml` holding `props`."""
    rows = "".join(
        f"  <property><name>{escape(k)}</name><value>{escape(v)}</value></property>\n" for k, v in props.items()
    )
    return f'<?xml version="1.0"?>\n<configuration>\n{rows}</configuration>\n'


def java_home() -> str:
    """JAVA_HOME of the `java` on PATH (containers need it: the NodeManager passes it to them)."""
    if "JAVA_HOME" in os.environ:
        return os.environ["JAVA_HOME"]
    java = subprocess.run(["readlink", "-f", "/usr/bin/java"], capture_output=True, text=True, check=True)
    return str(Path(java.stdout.strip()).parent.parent)


class YarnLabError(RuntimeError):
    """The YARN lab did not come up; the message has the daemons' log tails."""


@dataclass
class YarnLab:
    """A running YARN cluster (see the module docstring)."""

    rm_address: str
    dir: Path
    rm_host: LabHost | None = None
    nm_hosts: list[LabHost] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf_dir(self) -> Path:
        """The clients' Hadoop configuration (HADOOP_CONF_DIR, YARN_CONF_DIR)."""
        return self.dir / "conf"

    @property
    def web_url(self) -> str:
        return f"http://{self.rm_address}:{RM_WEB_PORT}"

    @property
    def nodemanagers(self) -> int:
        return max(1, len(self.nm_hosts))

    @classmethod
    def start(cls, lab: HostLab | None = None) -> YarnLab:
        """ResourceManager on the lab's last host, NodeManagers on its first two (netns mode)."""
        if not (jars_dir() / f"hadoop-client-minicluster-{VERSION}.jar").exists():
            raise YarnLabError(f"no YARN jars in {jars_dir()}: run `make yarn-lab` first")
        netns = lab is not None and lab.mode == "netns"
        rm_host = lab.hosts[-1] if netns and lab else None
        nm_hosts = lab.hosts[:2] if netns and lab else []
        address = rm_host.address if rm_host else "127.0.0.1"
        yarn = cls(address, Path(tempfile.mkdtemp(prefix="sg-yarn-")), rm_host, nm_hosts)
        yarn.dir.chmod(0o755)
        try:
            yarn._write_conf()
            for i in range(yarn.nodemanagers):  # they retry until the ResourceManager answers
                yarn._start_daemon(f"nm{i + 1}", nm_hosts[i] if nm_hosts else None)
            yarn.start_rm()
            yarn.wait_nodes()
        except BaseException:
            yarn.stop()
            raise
        return yarn

    # ----------------------------------------------------------------- configuration
    def core_site(self) -> dict[str, str]:
        return {
            "fs.defaultFS": "file:///",
            "hadoop.tmp.dir": str(self.dir / "tmp"),
            "ipc.client.connect.max.retries": "2",
            "ipc.client.connect.retry.interval": "200",
        }

    def yarn_site(self) -> dict[str, str]:
        return {
            "yarn.resourcemanager.hostname": self.rm_address,
            "yarn.resourcemanager.address": f"{self.rm_address}:{RM_PORT}",
            "yarn.resourcemanager.webapp.address": f"{self.rm_address}:{RM_WEB_PORT}",
            "yarn.resourcemanager.connect.max-wait.ms": "10000",
            "yarn.resourcemanager.connect.retry-interval.ms": "500",
            "yarn.resourcemanager.recovery.enabled": "false",
            # NodeManagers wait for a stopped ResourceManager (stop_rm/start_rm) instead of shutting down
            "yarn.nodemanager.resourcemanager.connect.max-wait.ms": "600000",
            "yarn.nodemanager.resourcemanager.connect.retry-interval.ms": "1000",
            "yarn.resourcemanager.scheduler.class":
                "org.apache.hadoop.yarn.server.resourcemanager.scheduler.capacity.CapacityScheduler",
            "yarn.scheduler.minimum-allocation-mb": "128",
            "yarn.scheduler.maximum-allocation-mb": "4096",
            "yarn.scheduler.maximum-allocation-vcores": "4",
            "yarn.nodemanager.resource.memory-mb": "8192",
            "yarn.nodemanager.resource.cpu-vcores": "8",
            "yarn.nodemanager.vmem-check-enabled": "false",
            "yarn.nodemanager.pmem-check-enabled": "false",
            "yarn.nodemanager.disk-health-checker.max-disk-utilization-per-disk-percentage": "100",
            "yarn.nodemanager.disk-health-checker.min-free-space-per-disk-mb": "0",
            "yarn.nodemanager.local-dirs": "${sg.nm.dir}/local",
            "yarn.nodemanager.log-dirs": "${sg.nm.dir}/logs",
            "yarn.nodemanager.address": "0.0.0.0:0",
            "yarn.nodemanager.delete.debug-delay-sec": "0",
            "yarn.nodemanager.sleep-delay-before-sigkill.ms": "500",
            "yarn.nodemanager.process-kill-wait.ms": "500",
            "yarn.nodemanager.env-whitelist": "JAVA_HOME,PATH,LANG",
            "yarn.log-aggregation-enable": "false",
            "yarn.resourcemanager.nodemanagers.heartbeat-interval-ms": "250",
        }  # fmt: skip

    def capacity_scheduler(self) -> dict[str, str]:
        share = f"{100 / len(QUEUES):g}"
        props = {
            "yarn.scheduler.capacity.root.queues": ",".join(QUEUES),
            "yarn.scheduler.capacity.maximum-am-resource-percent": "1.0",
            "yarn.scheduler.capacity.maximum-applications": "100",
        }
        for queue in QUEUES:
            props[f"yarn.scheduler.capacity.root.{queue}.capacity"] = share
            props[f"yarn.scheduler.capacity.root.{queue}.maximum-capacity"] = "100"
            props[f"yarn.scheduler.capacity.root.{queue}.maximum-am-resource-percent"] = "1.0"
            props[f"yarn.scheduler.capacity.root.{queue}.user-limit-factor"] = "10"
        return props

    def _write_conf(self) -> None:
        self.conf_dir.mkdir()
        (self.dir / "tmp").mkdir()
        files = {
            "core-site.xml": self.core_site(),
            "yarn-site.xml": self.yarn_site(),
            "capacity-scheduler.xml": self.capacity_scheduler(),
        }
        for name, props in files.items():
            (self.conf_dir / name).write_text(site_xml(props))
        (self.conf_dir / "log4j.properties").write_text(
            "log4j.rootLogger=INFO,console\nlog4j.appender.console=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.console.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.console.layout.ConversionPattern=%d{HH:mm:ss,SSS} %p %c{1}: %m%n\n"
        )

    # ----------------------------------------------------------------- daemons
    def _start_daemon(self, name: str, host: LabHost | None) -> None:
        main = {
            "rm": "org.apache.hadoop.yarn.server.resourcemanager.ResourceManager",
            "nm": "org.apache.hadoop.yarn.server.nodemanager.NodeManager",
        }[name.rstrip("0123456789")]
        work = self.dir / name
        work.mkdir(exist_ok=True)
        prefix = host._nsenter() if host else []  # noqa: SLF001 (enter the lab host's namespaces)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JAVA_HOME": java_home(), "HOME": str(work),
               "HADOOP_CONF_DIR": str(self.conf_dir), "LANG": "C.UTF-8"}  # fmt: skip
        command = [
            *prefix, f"{env['JAVA_HOME']}/bin/java", DAEMON_HEAP, "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            f"-Dsg.nm.dir={work}", f"-Dhadoop.log.dir={work}", f"-Dyarn.log.dir={work}",
            f"-Dsg.yarn.lab={self.dir}", "-cp", f"{self.conf_dir}:{jars_dir()}/*", main,
        ]  # fmt: skip
        with (self.dir / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )

    def start_rm(self) -> None:
        """Start the ResourceManager (again, after `stop_rm`) and wait until its REST API answers."""
        self._start_daemon("rm", self.rm_host)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.procs["rm"].poll() is not None:
                raise YarnLabError(f"the ResourceManager exited ({self.procs['rm'].returncode}):\n{self.logs()}")
            with contextlib.suppress(OSError, ValueError):
                if self.rest("cluster/info")["clusterInfo"]["state"] == "STARTED":
                    return
            time.sleep(0.3)
        raise YarnLabError(f"the ResourceManager did not start within {START_TIMEOUT:g} s:\n{self.logs()}")

    def stop_rm(self) -> None:
        """Stop the ResourceManager (for tests of an RM that is down); `start_rm` brings it back."""
        self._stop([self.procs.pop("rm")])

    def wait_nodes(self) -> None:
        """Wait until every NodeManager is registered (restarting any that gave up on a stopped ResourceManager)."""
        for i, host in enumerate(self.nm_hosts or [None], start=1):
            if self.procs[f"nm{i}"].poll() is not None:
                self._start_daemon(f"nm{i}", host)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise YarnLabError(f"YARN daemon {dead[0]} exited:\n{self.logs()}")
            with contextlib.suppress(OSError, ValueError, KeyError):
                if self.rest("cluster/metrics")["clusterMetrics"]["activeNodes"] >= self.nodemanagers:
                    return
            time.sleep(0.3)
        raise YarnLabError(f"{self.nodemanagers} NodeManagers did not register in {START_TIMEOUT:g} s:\n{self.logs()}")

    def logs(self, lines: int = 20) -> str:
        parts = []
        for path in sorted(self.dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # ----------------------------------------------------------------- RM REST API
    def rest(self, path: str, query: dict[str, str] | None = None) -> dict[str, Any]:
        url = f"{self.web_url}/ws/v1/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as reply:
            return json.loads(reply.read())

    def apps(self, **query: str) -> list[dict[str, Any]]:
        """The RM's application records, filtered like the REST API (e.g. `applicationTags=KERNEL_ID`)."""
        return (self.rest("cluster/apps", query).get("apps") or {}).get("app", [])

    def app(self, app_id: str) -> dict[str, Any]:
        return self.rest(f"cluster/apps/{app_id}")["app"]

    def containers(self) -> list[int]:
        """Pids of container processes (AMs, executors) the NodeManagers run."""
        daemons = [p.pid for name, p in self.procs.items() if name.startswith("nm") and p.poll() is None]
        return [pid for d in daemons for pid in _children(d) if "container_" in _cmdline(pid)]

    def app_containers(self, app_id: str) -> list[int]:
        """Pids of the container processes of `app_id` still running under the NodeManagers."""
        prefix = "container_" + app_id.removeprefix("application_") + "_"
        return [pid for pid in self.containers() if prefix in _cmdline(pid)]

    # ----------------------------------------------------------------- stop
    def _stop(self, procs: list[subprocess.Popen[bytes]]) -> None:
        pids = [p.pid for p in procs if p.poll() is None]
        pids += [child for pid in pids for child in _children(pid)]
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
                for proc in procs:
                    proc.poll()
                time.sleep(0.1)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def stop(self) -> None:
        """Stop the daemons and every container they started; remove the work dir."""
        self._stop(list(self.procs.values()))
        self.procs.clear()
        leftovers = [pid for pid in _all_pids() if f"-Dsg.yarn.lab={self.dir}" in _cmdline(pid)]
        leftovers += [pid for pid in _all_pids() if str(self.dir) in _cmdline(pid) and "container_" in _cmdline(pid)]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


def _all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
