"""Scala (Apache Toree) kernels over SSH on a real Spark 3.5 standalone cluster (see docs/scala-kernels.md).

Toree 0.5 (apache-toree on PyPI) is built for Scala 2.12, so it runs on Spark 3.x only; the suite's own pyspark is
4.x (Scala 2.13). These tests use a second environment, `.venv-spark35` (`make spark35`: pyspark 3.5.x and
apache-toree 0.5.0), and skip when it is absent. The mismatch refusals need only pyspark 4 and the Toree jar.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from jupyter_client import AsyncKernelClient, AsyncKernelManager
from jupyter_client.session import Session

from spark_gateway.errors import ProvisionerError
from spark_gateway.specs import SpecOptions, install
from testlab.hostlab import HostLab
from testlab.jupyter_rest import AUTH, jupyter_server
from testlab.spark_cluster import SPARK_HOME as SPARK4_HOME
from testlab.spark_cluster import SparkCluster, spark_jvms
from tests.conftest import env, kernel_processes, wait_for

ROOT = Path(__file__).resolve().parent.parent
VENV35 = Path(os.environ.get("SG_SPARK35_VENV", ROOT / ".venv-spark35"))
SPARK35_HOMES = sorted(VENV35.glob("lib/python3*/site-packages/pyspark"))
TOREE_JARS = sorted(VENV35.glob("lib/python3*/site-packages/toree/lib/toree-assembly-*.jar"))
SPARK35_HOME = str(SPARK35_HOMES[0]) if SPARK35_HOMES else ""
TOREE_JAR = str(TOREE_JARS[0]) if TOREE_JARS else ""
needs_spark35 = pytest.mark.skipif(
    not (SPARK35_HOME and TOREE_JAR and list(Path(SPARK35_HOME or "/").glob("jars/scala-library-2.12.*.jar"))),
    reason=f"no Spark 3.5 + Apache Toree environment at {VENV35} (create it with `make spark35`)",
)
needs_toree = pytest.mark.skipif(not TOREE_JAR, reason=f"no Apache Toree jar in {VENV35} (`make spark35`)")
MODES = ("lazy", "eager")


def ns_pid(pid: int) -> int:
    """`pid` as the lab host's own PID namespace numbers it (what the gateway sees there)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


def toree_jvms() -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, cmd in spark_jvms() if "org.apache.toree.Main" in cmd]


@pytest.fixture(scope="module")
def cluster35(lab: HostLab) -> Iterator[SparkCluster]:
    """A Spark 3.5 standalone cluster (one worker) beside the suite's Spark 4 one, on other ports."""
    if not SPARK35_HOME:
        pytest.skip(f"no Spark 3.5 environment at {VENV35} (create it with `make spark35`)")
    cluster = SparkCluster.start(lab, spark_home=SPARK35_HOME, workers=1, netns_ports=(7177, 8180))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def scala_specs(kernels_dir: Path, cluster35: SparkCluster) -> Path:
    """ssh_scala_<mode> specs for the 3.5 cluster, installed by spark_gateway.specs (the Toree jar copied in)."""
    for mode in MODES:
        options = SpecOptions(language="Scala", spark=True, spark_master=cluster35.url, spark_home=SPARK35_HOME,
                              spark_init_mode=mode, kernel_name=f"ssh_scala_{mode}", toree_jar=TOREE_JAR,
                              extra_spark_opts="--driver-memory 512m --conf spark.executor.memory=512m",
                              config={"launch_timeout": 90})  # fmt: skip
        opts, _ = options.resolve()
        install(opts, kernels_dir / opts.kernel_name, replace=True)
    return kernels_dir


def client(km: AsyncKernelManager) -> AsyncKernelClient:
    """A client with its own session, as each jupyter_server connection has.

    Its ZeroMQ identity is its session id: Toree's ROUTER sockets do not hand an identity over to a new connection, so
    a second client sharing `km.client()`'s session with a connected one gets no replies (ipykernel does hand over).
    """
    kc = km.client(session=Session(key=km.session.key, signature_scheme=km.session.signature_scheme))
    kc.start_channels()
    return kc


async def execute(kc: AsyncKernelClient, code: str, timeout: float = 120) -> tuple[str, dict[str, Any]]:
    """Execute `code`; returns (stream + text/plain results + error text, execute_reply content)."""
    await kc.wait_for_ready(timeout=90)
    out: list[str] = []

    def hook(msg: dict) -> None:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            out.append(content["text"])
        elif msg["msg_type"] in ("execute_result", "display_data"):
            out.append(content["data"].get("text/plain", ""))
        elif msg["msg_type"] == "error":
            out.append(f"{content['ename']}: {content['evalue']}")

    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    # execute_interactive stops reading iopub at the cell's `idle` status; once in CI a lazy context's first use came
    # back `ok` with only Toree's "Waiting for a Spark session" line, its result missing: Toree can publish after
    # `idle`. Collect what follows until iopub has been quiet for a second.
    with contextlib.suppress(queue.Empty, asyncio.TimeoutError):
        while True:
            msg = await kc.get_iopub_msg(timeout=1)
            if msg["parent_header"].get("msg_id") == reply["parent_header"].get("msg_id"):
                hook(msg)
    return "".join(out), reply["content"]


async def run(km: AsyncKernelManager, code: str, timeout: float = 120) -> tuple[str, dict[str, Any]]:
    """Execute `code` from a new client."""
    kc = client(km)
    try:
        return await execute(kc, code, timeout)
    finally:
        kc.stop_channels()


async def until(predicate: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {predicate}")


# ~200 s of tasks on the cluster's 2 cores: only an interrupt ends it within the test's bounds.
LONG_JOB = "sc.parallelize(1 to 8000, 2).map { x => Thread.sleep(50); x }.sum"


@needs_spark35
@pytest.mark.asyncio
@pytest.mark.parametrize("mode", MODES)
async def test_scala_kernel_job_interrupt_and_shutdown(
    lab: HostLab, managers: Callable[..., AsyncKernelManager], scala_specs: Path, cluster35: SparkCluster, mode: str
) -> None:
    host = lab.hosts[0]
    ui_port = 4140 + MODES.index(mode)
    km = managers(f"ssh_scala_{mode}")
    await km.start_kernel(
        env=env(KERNEL_REMOTE_HOST=host.name, KERNEL_EXTRA_SPARK_OPTS=f"--conf spark.ui.port={ui_port}")
    )
    kid = km.kernel_id
    assert kid is not None
    [(pid, cmd)] = [(p, c) for p, c in kernel_processes(host, kid) if "org.apache.toree.Main" in c]
    assert ns_pid(pid) == km.provisioner.pid  # the gateway signals the JVM itself (run.sh, spark-submit exec'd it)
    if mode == "eager":  # Toree creates the context at start (after binding its sockets), before any cell runs
        assert (await until(lambda: cluster35.app(kid), timeout=60))["state"] == "RUNNING"
    else:  # before the context exists, Toree 0.5 cannot be interrupted safely: refused with the reason, cell runs on
        kc = client(km)
        await kc.wait_for_ready(timeout=90)
        cell = asyncio.ensure_future(execute(kc, 'Thread.sleep(6000); "slept"'))
        await asyncio.sleep(2)
        assert not cell.done()
        with pytest.raises(ProvisionerError, match="before its SparkContext exists.*not interrupted") as refused:
            await km.interrupt_kernel()
        assert refused.value.status_code == 409
        out, reply = await cell
        kc.stop_channels()
        assert reply["status"] == "ok" and "slept" in out, out
        assert cluster35.app(kid) is None  # still lazy: the refused interrupt created no context
        assert km.provisioner.spark["state"] == "starting"

    out, reply = await run(km, "sc.parallelize(1 to 100).sum")
    assert reply["status"] == "ok", out
    assert "5050.0" in out
    app = await until(lambda: cluster35.app(kid))
    assert app["state"] == "RUNNING"
    # Toree reports nothing itself: the listener finds the context (its thread, its Spark UI) for the gateway
    spark = await until(lambda: km.provisioner.spark.get("state") == "ready" and km.provisioner.spark)
    assert spark["app_id"] == app["id"] and spark["app_name"] == kid and spark["master"] == cluster35.url, spark
    assert spark["spark_version"].startswith("3.5.") and spark["ui_url"].endswith(f":{ui_port}"), spark
    assert (await km.provisioner.get_provisioner_info())["spark"] == spark

    kc = client(km)
    await kc.wait_for_ready(timeout=90)
    job = asyncio.ensure_future(execute(kc, LONG_JOB, timeout=300))
    await asyncio.sleep(4)  # the job's tasks run
    assert not job.done()
    await km.interrupt_kernel()
    out, reply = await asyncio.wait_for(job, 60)
    assert reply["status"] == "error" and "cancelled" in out, out
    # the kernel stays usable: for this client and for a new one
    assert (await execute(kc, "1 + 1", timeout=60))[0].strip() == "2"
    kc.stop_channels()
    out, reply = await run(km, "sc.parallelize(1 to 10).count", timeout=60)
    assert reply["status"] == "ok" and out.strip() == "10", out

    await km.shutdown_kernel()
    assert await until(lambda: not kernel_processes(host, kid), timeout=20)  # no JVM, no listener
    assert await until(lambda: cluster35.app(kid)["state"] != "RUNNING", timeout=20)
    assert await until(lambda: not cluster35.executors(app["id"]), timeout=30)
    assert not [cmd for _, cmd in toree_jvms() if kid in cmd]


@needs_spark35
@pytest.mark.asyncio
async def test_spark4_home_on_the_host_fails_the_start_with_the_reason(
    lab: HostLab, managers: Callable[..., AsyncKernelManager], scala_specs: Path
) -> None:
    """A spec whose SPARK_HOME was swapped for a Spark 4 one after installing: the launcher refuses at once."""
    spec_file = scala_specs / "ssh_scala_lazy" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["env"]["SPARK_HOME"] = SPARK4_HOME
    swapped = scala_specs / "ssh_scala_spark4"
    swapped.mkdir(exist_ok=True)
    for item in (scala_specs / "ssh_scala_lazy").iterdir():
        if item.name != "kernel.json" and not (swapped / item.name).exists():
            (swapped / item.name).symlink_to(item)
    (swapped / "kernel.json").write_text(json.dumps(spec).replace(str(scala_specs / "ssh_scala_lazy"), str(swapped)))
    host = lab.hosts[0]
    km = managers("ssh_scala_spark4")
    started = time.monotonic()
    with pytest.raises(Exception) as failed:
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    assert time.monotonic() - started < 30
    message = str(failed.value)
    assert "uses Scala 2.13" in message and "Apache Toree 0.5 needs Scala 2.12" in message, message
    assert not toree_jvms()


@needs_toree
def test_install_refuses_spark4_with_the_reason(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "spark_gateway.sshspec", "install", f"--prefix={tmp_path}", "--language=Scala",
           "--spark", f"--spark-home={SPARK4_HOME}", f"--toree-jar={TOREE_JAR}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode != 0
    [line] = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "is built for Scala 2.12 (Spark 3.x)" in line and "uses Scala 2.13" in line, line
    assert "NoSuchMethodError" in line and "--spark-home of a Spark 3.x installation" in line, line
    assert not (tmp_path / "share/jupyter/kernels/ssh_scala_spark").exists()


@needs_spark35
def test_scala_refused_interrupt_reaches_rest_clients(
    lab: HostLab, scala_specs: Path, cluster35: SparkCluster, tmp_path: Path
) -> None:
    """The interrupt button on a lazy kernel without a context: HTTP 409 with the reason; restart and shutdown work."""
    with jupyter_server(lab, tmp_path, [scala_specs / "ssh_scala_lazy"]) as base:
        r = requests.post(f"{base}/api/kernels", json={"name": "ssh_scala_lazy"}, headers=AUTH, timeout=120)
        assert r.status_code == 201, r.text
        kid = r.json()["id"]
        host = next(h for h in lab.hosts if kernel_processes(h, kid))
        for attempt in ("first kernel", "after a restart"):
            r = requests.post(f"{base}/api/kernels/{kid}/interrupt", headers=AUTH, timeout=30)
            assert r.status_code == 409, (attempt, r.text)
            assert "cannot interrupt a Scala kernel before its SparkContext exists" in r.json()["message"]
            state = requests.get(f"{base}/api/kernels/{kid}", headers=AUTH, timeout=10).json()["execution_state"]
            assert state != "dead" and cluster35.app(kid) is None, (attempt, state)
            if attempt == "first kernel":  # restart (and shutdown) interrupt first: a refusal must not stop them
                jvm = kernel_processes(host, kid)
                r = requests.post(f"{base}/api/kernels/{kid}/restart", headers=AUTH, timeout=120)
                assert r.status_code == 200, r.text
                assert kernel_processes(host, kid) and kernel_processes(host, kid) != jvm
        assert requests.delete(f"{base}/api/kernels/{kid}", headers=AUTH, timeout=60).status_code == 204
        assert wait_for(lambda: not kernel_processes(host, kid), 20)
