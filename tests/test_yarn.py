"""YARN client kernels against a real Hadoop YARN (testlab/yarn_lab.py): a ResourceManager on lab host 3 and a
NodeManager on hosts 1 and 2, so ApplicationMasters and executors run in NodeManager containers on cluster hosts.

Kernels are Spark drivers on lab hosts over SSH, as in production. Every test here is marked `yarn`
(`pytest -m yarn`); the YARN lab starts with the first of them and is shared by all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from jupyter_client import AsyncKernelManager

from spark_gateway import yarn
from spark_gateway.specs import SpecOptions, install
from testlab.hostlab import HostLab, LabHost
from testlab.jupyter_rest import run_code
from testlab.lab_accounts import Accounts, lab_accounts
from testlab.server_process import ServerProcess
from testlab.spark_cluster import SPARK_HOME
from testlab.yarn_lab import YarnLab, jars_dir, site_xml
from tests.conftest import env, execute, kernel_processes
from tests.test_scala_kernel import SPARK35_HOME, TOREE_JAR, needs_spark35
from tests.test_scala_kernel import client as scala_client
from tests.test_scala_kernel import execute as scala_execute
from tests.test_security import GATEWAY, impersonating, owners, readable_by_all
from tests.test_spark import log_text, submit_args, until
from tests.test_sshspec import kernel_json, sshspec, tables

pytestmark = [pytest.mark.asyncio, pytest.mark.yarn]

# Small enough for a 2-core machine; pyspark's jars are used where they are (local:), never zipped and uploaded.
SMALL = (
    "--conf spark.yarn.am.memory=512m --executor-memory 512m --num-executors 1 --executor-cores 1 "
    f"--conf spark.yarn.jars=local:{SPARK_HOME}/jars/* --conf spark.ui.showConsoleProgress=false"
)
ENDED = ("FINISHED", "KILLED", "FAILED")
LAUNCH_BOUND = 600  # a bound, not a figure: JVMs start slowly on a loaded 2-core machine
CELL_BOUND = 600.0
END_BOUND = 60.0  # seconds from a kernel's end (shutdown, restart, SIGKILL) to its application's end, containers gone


def install_yarn_specs(kernels_dir: Path, yarn_lab: YarnLab) -> Path:
    """`yarn_lazy` and `yarn_eager` specs (spark_gateway.specs) in `kernels_dir`, naming the lab's Hadoop conf."""
    for mode in ("lazy", "eager"):
        opts, _ = SpecOptions(spark=True, spark_master="yarn", spark_init_mode=mode, kernel_name=f"yarn_{mode}",
                              spark_home=SPARK_HOME, extra_spark_opts=SMALL,
                              config={"launch_timeout": LAUNCH_BOUND}).resolve()  # fmt: skip
        path = install(opts, kernels_dir / f"yarn_{mode}", replace=True)
        data = json.loads((path / "kernel.json").read_text())
        data["env"].update(HADOOP_CONF_DIR=str(yarn_lab.conf_dir), YARN_CONF_DIR=str(yarn_lab.conf_dir),
                           SPARK_PRINT_LAUNCH_COMMAND="1")  # fmt: skip
        (path / "kernel.json").write_text(json.dumps(data))
    return kernels_dir


@pytest.fixture(scope="module")
def yarn_specs(kernels_dir: Path, yarn_lab: YarnLab) -> Path:
    """The YARN specs in the session's kernels directory."""
    return install_yarn_specs(kernels_dir, yarn_lab)


@pytest.fixture
def yarn_accounts(lab: HostLab, yarn_lab: YarnLab) -> Iterator[Accounts]:
    """`sggw` (the gateway's SSH account, may `sudo -u` alice and bob) and alice and bob on lab host 2, a NodeManager
    host (which must keep seeing its jars), with the YARN specs where all of them can read them (lab_accounts.py).
    For one test only: while they exist, that host's /root is another, so its NodeManager cannot localise what
    drivers of other hosts stage in root's ~/.sparkStaging."""
    if lab.mode != "netns":
        pytest.skip("accounts private to one host need the lab's netns mode (root)")
    keys = lab.dir / "authorized_keys"
    with lab_accounts(lab.hosts[1], GATEWAY, ["alice", "bob"], keys, visible=(jars_dir(),)) as made:
        kernels = install_yarn_specs(made.base / "kernels", yarn_lab)
        readable_by_all(kernels)
        yield made


@pytest_asyncio.fixture
async def as_sggw(lab: HostLab, yarn_accounts: Accounts) -> AsyncIterator[Callable[..., AsyncKernelManager]]:
    """Kernel managers of a gateway that logs in as sggw and impersonates; kernels still up are shut down."""
    async with impersonating(lab, yarn_accounts) as make:
        yield make


def rm_app(yarn_lab: YarnLab, kernel_id: str) -> dict[str, Any] | None:
    """The RM's record of the latest application tagged with `kernel_id`, else None."""
    apps = yarn_lab.apps(applicationTags=kernel_id)
    return max(apps, key=lambda a: a["startedTime"]) if apps else None


def app_processes(lab: HostLab, app_id: str) -> dict[str, list[int]]:
    """Container processes (AM, executors) of `app_id` on each NodeManager host."""
    hosts: list[LabHost] = lab.hosts[:2]
    found = {h.name: [pid for pid, cmd in h.processes() if app_id in cmd and "java" in cmd] for h in hosts}
    return {name: pids for name, pids in found.items() if pids}


async def ended(yarn_lab: YarnLab, lab: HostLab, app_id: str) -> dict[str, Any]:
    """Wait (at most END_BOUND) until `app_id` has ended and left no container process; its final record."""
    start = time.monotonic()
    await until(lambda: yarn_lab.app(app_id)["state"] in ENDED, timeout=END_BOUND)
    await until(lambda: not app_processes(lab, app_id), timeout=max(1.0, END_BOUND - (time.monotonic() - start)))
    return yarn_lab.app(app_id)


async def test_lazy_kernel_runs_jobs_on_yarn_interrupts_and_shuts_down(lab, managers, yarn_lab, yarn_specs, caplog):
    caplog.set_level(logging.INFO)
    host = lab.hosts[0]
    km = managers("yarn_lazy")
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    assert km.provisioner.spark["state"] == "starting"  # ready before its session
    code = (
        "import json, socket\n"
        "hosts = sorted(set(sc.parallelize(range(4), 2).map(lambda _: socket.gethostname()).collect()))\n"
        "total = spark.range(1000).selectExpr('sum(id)').first()[0]\n"
        "print(json.dumps([hosts, total, sc.applicationId, spark.conf.get('spark.yarn.maxAppAttempts')]))"
    )
    out, reply = await execute(km, code, timeout=CELL_BOUND)
    assert reply["status"] == "ok", out
    first, last = out.strip().splitlines()[0], out.strip().splitlines()[-1]
    hosts, total, app_id, attempts = json.loads(last)
    assert total == 499500 and attempts == "1"
    assert set(hosts) <= {"sg-host1", "sg-host2"} and hosts  # executors ran in NodeManager containers
    app = yarn_lab.app(app_id)
    assert (app["name"], app["state"], app["queue"], app["user"]) == (km.kernel_id, "RUNNING", "root.default", "root")
    assert set(app["applicationTags"].split(",")) == {
        km.kernel_id,
        yarn.GATEWAY_TAG,
        yarn.gateway_tag(km.provisioner.yarn_gateway_id),
    }
    assert app["amHostHttpAddress"].split(":")[0] in ("sg-host1", "sg-host2")
    assert app["runningContainers"] >= 2  # the AM and an executor
    assert set(app_processes(lab, app_id)) <= {"sg-host1", "sg-host2"} and app_processes(lab, app_id)

    tracking = f"{yarn_lab.web_url}/proxy/{app_id}/"
    info = await until(lambda: km.provisioner.spark.get("state") == "ready" and km.provisioner.spark)
    assert (info["app_id"], info["tracking_url"]) == (app_id, tracking)
    assert (await km.provisioner.get_provisioner_info())["spark"] == info
    assert first.startswith(f"Spark application {app_id} ({km.kernel_id}) on yarn; Spark UI: http")
    assert first.endswith(f"; YARN tracking URL: {tracking}")
    assert f"YARN tracking URL {tracking}" in log_text(km)
    assert any(app_id in r.getMessage() and tracking in r.getMessage() for r in caplog.records)

    # Interrupt: the YARN job is cancelled and the kernel stays usable.
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        msg_id = kc.execute("sc.parallelize([0], 1).foreach(lambda _: __import__('time').sleep(3600))")
        await until(
            lambda: yarn_lab.app(app_id)["runningContainers"] >= 2 and _has_running_job(yarn_lab, app_id),
            timeout=CELL_BOUND,
        )
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert (reply["content"]["status"], reply["content"]["ename"]) == ("error", "KeyboardInterrupt")
    finally:
        kc.stop_channels()
    assert "interrupt: cancelled the Spark jobs of" in log_text(km)  # the cell's job group
    out, reply = await execute(km, "print('after', spark.range(7).count())", timeout=CELL_BOUND)
    assert reply["status"] == "ok" and out.strip() == "after 7"

    await km.shutdown_kernel()
    final = await ended(yarn_lab, lab, app_id)
    assert final["state"] in ("FINISHED", "KILLED") and final["runningContainers"] in (0, -1)
    assert kernel_processes(host, km.kernel_id) == []


def _has_running_job(yarn_lab: YarnLab, app_id: str) -> bool:
    """True once the driver's Spark UI, read through the RM's web proxy (the tracking URL), shows a running job."""
    url = f"{yarn_lab.web_url}/proxy/{app_id}/api/v1/applications/{app_id}/jobs?status=running"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return bool(json.loads(reply.read()))
    except (OSError, ValueError):
        return False


async def test_eager_impersonated_kernel_in_queue_q1_restart_and_sigkill(lab, yarn_lab, yarn_accounts, as_sggw):
    """Eager, impersonating alice (the gateway logs in as sggw: `sudo -n -u alice` on the host), in queue q1: the
    application is alice's in the RM, the kernel and its driver JVM run as alice, a job runs; restart and SIGKILL
    end the application."""
    host = yarn_accounts.host
    km = as_sggw("yarn_eager")
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name, KERNEL_EXTRA_SPARK_OPTS="--queue q1"))
    assert km.provisioner.spark["state"] == "ready"  # the application ran before the kernel was
    app_id = km.provisioner.spark["app_id"]
    app = yarn_lab.app(app_id)
    assert (app["name"], app["state"], app["queue"], app["user"]) == (km.kernel_id, "RUNNING", "root.q1", "alice")
    assert owners(yarn_accounts, km.kernel_id) == {"root": {"sudo"}, "alice": {"python", "java"}}
    args = submit_args(log_text(km))
    assert args[args.index("--queue") + 1] == "q1"
    tags = f"spark.yarn.tags={yarn.GATEWAY_TAG},{yarn.gateway_tag(km.provisioner.yarn_gateway_id)},{km.kernel_id}"
    assert tags in args
    code = "import getpass; print(getpass.getuser(), sc.sparkUser(), spark.range(5).count())"
    out = (await execute(km, code, timeout=CELL_BOUND))[0]
    assert out.strip().splitlines()[-1] == "alice alice 5"
    assert out.startswith(f"Spark application {app_id} ({km.kernel_id}) on yarn; Spark UI: http")

    await km.restart_kernel()
    assert (await ended(yarn_lab, lab, app_id))["state"] in ("FINISHED", "KILLED")
    second = km.provisioner.spark["app_id"]
    assert second != app_id and yarn_lab.app(second)["state"] == "RUNNING"
    assert (yarn_lab.app(second)["name"], yarn_lab.app(second)["user"]) == (km.kernel_id, "alice")

    # SIGKILL of the kernel on its host: the driver dies with it; the restarter's restart cleans up.
    pid = km.provisioner.pid
    host.run(["kill", "-KILL", str(pid)])
    await until(lambda: not any(p == pid for p, _ in kernel_processes(host, km.kernel_id)), timeout=10)
    assert (await ended(yarn_lab, lab, second))["state"] in ("FINISHED", "KILLED")
    await km.shutdown_kernel(now=True)
    assert kernel_processes(host, km.kernel_id) == []


async def test_unknown_queue_fails_the_start_with_yarns_reason(lab, managers, yarn_lab, yarn_specs):
    host = lab.hosts[0]
    eager, lazy = managers("yarn_eager"), managers("yarn_lazy")
    opts = env(KERNEL_REMOTE_HOST=host.name, KERNEL_EXTRA_SPARK_OPTS="--queue nosuchqueue")
    with pytest.raises(Exception, match="nosuchqueue") as info:
        await eager.start_kernel(env=opts)
    assert info.value.status_code == 500 and "cannot create the SparkSession (eager mode)" in str(info.value)
    assert "unknown queue" in str(info.value).lower() or "does not exist" in str(info.value)
    assert kernel_processes(host, eager.kernel_id) == []

    await lazy.start_kernel(env=opts)
    out, reply = await execute(lazy, "spark.range(1).count()", timeout=CELL_BOUND)
    assert reply["status"] == "error" and reply["ename"] == "SparkSessionError"
    assert "nosuchqueue" in out
    assert (await execute(lazy, "print(6 * 7)"))[0].strip() == "42"
    await lazy.shutdown_kernel()


def ghost_driver(host: LabHost, yarn_lab: YarnLab, kernel_id: str, gateway_id: str) -> subprocess.Popen[bytes]:
    """A Spark driver on `host` whose YARN application carries the tags of kernel `kernel_id` of gateway
    `gateway_id`, though no kernel of that gateway runs it (left by a gateway that was killed)."""
    code = (
        "from pyspark.sql import SparkSession; import time\n"
        "s = SparkSession.builder.getOrCreate(); print('up', flush=True); time.sleep(600)"
    )
    submit = f"--master yarn --name {kernel_id} {SMALL} {yarn.submit_conf(kernel_id, gateway_id)}"
    return subprocess.Popen(
        [*host._nsenter(), "env", f"HADOOP_CONF_DIR={yarn_lab.conf_dir}", f"SPARK_HOME={SPARK_HOME}",
         f"PYSPARK_SUBMIT_ARGS={submit} pyspark-shell", sys.executable, "-c", code],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


async def running_app(yarn_lab: YarnLab, kernel_id: str, driver: subprocess.Popen[bytes] | None = None) -> str:
    """The id of the application of `kernel_id`, once RUNNING (failing at once if its `driver` process exits)."""

    def running() -> str | None:
        assert driver is None or driver.poll() is None, f"the driver of {kernel_id} exited ({driver.returncode})"
        app = rm_app(yarn_lab, kernel_id)
        return app["id"] if app and app["state"] == "RUNNING" else None

    return await until(running, CELL_BOUND)


async def test_orphaned_applications_are_killed_at_the_first_launch_and_at_cleanup(lab, managers, yarn_lab, yarn_specs):
    """Applications tagged by this gateway with a kernel id it does not run are killed through the RM's REST API:
    one left by an earlier run when the gateway launches its first YARN kernel (yarn.Sweeps), before that kernel
    ends; one that appears later when the gateway next cleans up a YARN kernel."""
    host = lab.hosts[0]
    gateway_id = f"test-{uuid.uuid4().hex[:8]}"  # a gateway that has not launched a YARN kernel yet
    ghosts = [str(uuid.uuid4()), str(uuid.uuid4())]
    proc = ghost_driver(host, yarn_lab, ghosts[0], gateway_id)
    try:
        orphan = await running_app(yarn_lab, ghosts[0], proc)
        km = managers("yarn_lazy", yarn_gateway_id=gateway_id)
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
        assert (await ended(yarn_lab, lab, orphan))["state"] == "KILLED"
        assert km.has_kernel and await km.is_alive()
        proc.kill()
        proc.wait()
        proc = ghost_driver(host, yarn_lab, ghosts[1], gateway_id)
        later = await running_app(yarn_lab, ghosts[1], proc)
        await km.shutdown_kernel()
        assert (await ended(yarn_lab, lab, later))["state"] == "KILLED"
    finally:
        proc.kill()
        proc.wait()


async def test_gateway_start_kills_orphans_and_spares_restored_kernels(lab, yarn_lab, yarn_specs, tmp_path):
    """A `jupyter server` (DistributedMappingKernelManager) runs two lazy YARN kernels and is SIGKILLed; the session
    record of one is lost (as when its host stayed away longer than unreachable_grace at a restart), so the next
    server knows nothing of it while its driver still holds a RUNNING application. The next start restores the other
    kernel, whose application keeps running, and kills the lost one's through the RM's REST API, with no kernel
    started or stopped meanwhile."""
    gateway_id = f"server-{uuid.uuid4().hex[:8]}"
    server = ServerProcess(lab, tmp_path, [yarn_specs / "yarn_lazy"], SG_YARN_GATEWAY_ID=gateway_id)
    kept = lost = ""
    try:
        server.start()
        kept, lost = server.start_kernel("yarn_lazy"), server.start_kernel("yarn_lazy")
        apps = {kernel_id: await running_app(yarn_lab, kernel_id) for kernel_id in (kept, lost)}
        assert yarn.gateway_tag(gateway_id) in rm_app(yarn_lab, lost)["applicationTags"].split(",")
        server.kill()
        (server.store / f"{lost}.json").unlink()
        server.start()
        await until(lambda: yarn_lab.app(apps[lost])["state"] == "KILLED", timeout=120)
        # the server logs the kill once the RM has answered its PUT, which can be after the RM shows KILLED
        await until(lambda: f"killed YARN application {apps[lost]}" in server.log_text(), timeout=30)
        assert kept in server.kernels(), server.log_text()[-3000:]
        assert yarn_lab.app(apps[kept])["state"] == "RUNNING", server.log_text()[-3000:]
        assert (await run_code(server.base, kept, "print(sc.applicationId)")).strip().endswith(apps[kept])
    finally:
        if server.proc is not None:
            for kernel_id in server.kernels():
                server.delete_kernel(kernel_id)
            server.stop()
        for host in lab.hosts:  # the lost kernel runs on, unknown to the server (the kept one too if no server is up)
            for pid, _ in [found for k in (kept, lost) if k for found in kernel_processes(host, k)]:
                host.run(["kill", "-KILL", str(pid)], check=False)


async def test_an_idle_yarn_kernel_is_culled_by_jupyter_server_with_its_application(
    lab, yarn_lab, yarn_specs, tmp_path
):
    """jupyter_server's idle culling (cull_idle_timeout) ends a YARN kernel on its host, and its application ends in
    the RM with no container left on the NodeManagers."""
    server = ServerProcess(lab, tmp_path, [yarn_specs / "yarn_lazy"])
    server.args = ["--MappingKernelManager.cull_idle_timeout=10", "--MappingKernelManager.cull_interval=2"]
    try:
        server.start()
        kernel_id = server.start_kernel("yarn_lazy")
        host = next(h for h in lab.hosts if kernel_processes(h, kernel_id))
        code = "try:\n    print(sc.applicationId, spark.range(7).count())\nexcept Exception as e:\n    print(repr(e))"
        out = await run_code(server.base, kernel_id, code)
        words = out.strip().splitlines()[-1].split() if out.strip() else []  # after the "Spark application" line
        assert len(words) == 2, f"cell output {out!r}; server log: {server.log_text()[-3000:]}"
        app_id, count = words
        assert count == "7" and yarn_lab.app(app_id)["state"] == "RUNNING"
        await until(lambda: kernel_id not in server.kernels(), timeout=120)
        assert "Culling 'idle' kernel" in server.log_text()
        assert (await ended(yarn_lab, lab, app_id))["state"] in ENDED
        await until(lambda: not kernel_processes(host, kernel_id), timeout=30)
    finally:
        if server.proc is not None:
            for kid in server.kernels():
                server.delete_kernel(kid)
            server.stop()


async def test_resource_manager_down_fails_the_start_with_the_reason(lab, managers, yarn_lab, yarn_specs):
    host = lab.hosts[1]
    yarn_lab.stop_rm()
    try:
        km = managers("yarn_eager")
        started = time.monotonic()
        with pytest.raises(Exception, match="cannot create the SparkSession") as info:
            await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
        assert "Connection refused" in str(info.value) or "connection exception" in str(info.value)
        assert time.monotonic() - started < km.provisioner.launch_timeout if km.provisioner else True
        assert kernel_processes(host, km.kernel_id) == []
    finally:
        yarn_lab.start_rm()
        yarn_lab.wait_nodes()
    await asyncio.sleep(0)


async def test_ssh_spec_install_check_and_convert_for_yarn(lab, yarn_lab, tmp_path):
    """`ssh-spec install --spark-master yarn` writes HADOOP_CONF_DIR/YARN_CONF_DIR and the jars setting; `check`
    verifies on each host the Hadoop configuration, that its RM answers from there and that the spec's queue exists."""
    kernels = tmp_path / "share/jupyter/kernels"
    path = {"JUPYTER_PATH": str(tmp_path / "share/jupyter")}
    remote = [f"--remote-hosts={h.name}" for h in lab.hosts[:2]]
    jars = f"local:{SPARK_HOME}/jars/*"
    down = tmp_path / "down-conf"  # names an RM port nothing listens on
    down.mkdir()
    (down / "yarn-site.xml").write_text(
        site_xml({"yarn.resourcemanager.address": f"{lab.gateway_address}:9",
                  "yarn.resourcemanager.webapp.address": f"{lab.gateway_address}:9"})
    )  # fmt: skip
    for name, args in (
        ("yarn_ok", [f"--hadoop-conf-dir={yarn_lab.conf_dir}", f"--yarn-jars={jars}", "--extra-spark-opts=--queue q1"]),
        ("yarn_noconf", ["--hadoop-conf-dir=/nonexistent/hadoop"]),
        ("yarn_noqueue", [f"--hadoop-conf-dir={yarn_lab.conf_dir}", "--extra-spark-opts=--queue nosuchqueue"]),
        ("yarn_down", [f"--hadoop-conf-dir={down}"]),
    ):
        proc = sshspec("install", f"--prefix={tmp_path}", "--spark", "--spark-master=yarn", f"--kernel-name={name}",
                       f"--spark-home={SPARK_HOME}", *remote, *args, home=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    spec = kernel_json(kernels / "yarn_ok")
    assert spec["env"]["HADOOP_CONF_DIR"] == spec["env"]["YARN_CONF_DIR"] == str(yarn_lab.conf_dir)
    assert f"--conf 'spark.yarn.jars={jars}' --queue q1 ${{KERNEL_EXTRA_SPARK_OPTS}}" in spec["env"]["SPARK_OPTS"]

    proc = sshspec("check", "yarn_ok", "yarn_noconf", "yarn_noqueue", "yarn_down", f"--ssh-config={lab.ssh_config}",
                   home=tmp_path, **path)  # fmt: skip
    result, out = tables(proc.stdout), proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    for host in lab.hosts[:2]:
        assert result["yarn_ok"][host.name]["spark-submit"] == "ok", out
        for name in ("yarn_noconf", "yarn_noqueue", "yarn_down"):
            assert result[name][host.name]["spark-submit"] == "FAIL", out
            assert result[name][host.name]["interpreter"] == "ok", out
    assert "/nonexistent/hadoop/yarn-site.xml does not exist" in out
    assert "fix: install the cluster's Hadoop client configuration" in out
    assert "queue 'nosuchqueue' does not exist" in out and "(queues: default, q1)" in out
    assert f"the ResourceManager's {lab.gateway_address}:9 (from {down}/yarn-site.xml) does not answer" in out
    assert "fix: start the ResourceManager" in out

    # convert: yarn -> standalone -> yarn round-trips (the Hadoop settings stay), standalone -> yarn adds them.
    assert sshspec("convert", "yarn_ok", "--to=standalone", "--spark-master=spark://h:7077", home=tmp_path,
                   **path).returncode == 0  # fmt: skip
    assert sshspec("convert", "yarn_ok_standalone", "--to=yarn", home=tmp_path, **path).returncode == 0
    back = kernel_json(kernels / "yarn_ok_yarn")
    assert back["env"] == json.loads(json.dumps(spec["env"]).replace("/yarn_ok/", "/yarn_ok_yarn/"))
    proc = sshspec("install", f"--prefix={tmp_path}", "--spark", "--spark-master=spark://h:7077",
                   "--kernel-name=plain", home=tmp_path)  # fmt: skip
    assert "HADOOP_CONF_DIR" not in kernel_json(kernels / "plain")["env"]
    assert (
        sshspec("convert", "plain", "--to=yarn", "--hadoop-conf-dir=/srv/hadoop", home=tmp_path, **path).returncode == 0
    )
    assert kernel_json(kernels / "plain_yarn")["env"]["HADOOP_CONF_DIR"] == "/srv/hadoop"


@needs_spark35
async def test_scala_lazy_kernel_runs_a_job_on_yarn(lab, managers, yarn_lab, kernels_dir):
    """Toree (Spark 3.5, `make spark35`) on YARN: its first use of `sc` starts the application in the RM."""
    small = SMALL.replace(SPARK_HOME, SPARK35_HOME)
    opts, _ = SpecOptions(language="Scala", spark=True, spark_master="yarn", spark_home=SPARK35_HOME,
                          spark_init_mode="lazy", kernel_name="yarn_scala", toree_jar=TOREE_JAR, extra_spark_opts=small,
                          hadoop_conf_dir=str(yarn_lab.conf_dir),
                          config={"launch_timeout": LAUNCH_BOUND}).resolve()  # fmt: skip
    install(opts, kernels_dir / "yarn_scala", replace=True)
    km = managers("yarn_scala")
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[0].name))
    code = 'println(sc.parallelize(1 to 100, 2).sum.toLong + " " + sc.applicationId)'
    kc = scala_client(km)
    try:
        await kc.wait_for_ready(timeout=CELL_BOUND)  # Toree's JVM can take long to boot on a loaded machine
        out, reply = await scala_execute(kc, code, timeout=CELL_BOUND)
    finally:
        kc.stop_channels()
    assert reply["status"] == "ok", out
    found = re.search(r"\b(\d+) (application_\d+_\d+)", out)  # after Toree's "Waiting for a Spark session..."
    assert found, out
    total, app_id = found.groups()
    app = yarn_lab.app(app_id)
    assert total == "5050" and (app["name"], app["state"]) == (km.kernel_id, "RUNNING")
    assert km.kernel_id in app["applicationTags"].split(",")
    await km.shutdown_kernel()
    assert (await ended(yarn_lab, lab, app_id))["state"] in ("FINISHED", "KILLED")


async def test_connect_kernel_on_a_yarn_engine_and_its_idle_end(lab, managers, yarn_lab, kernels_dir):
    """A user-level Spark Connect kernel on YARN: its engine is a YARN application tagged as an engine (not with the
    kernel id: the gateway's reconciliation never takes a shared engine), and once the kernel is gone the engine
    stops itself after engine_idle_timeout: the application FINISHES and leaves no container."""
    opts, _ = SpecOptions(spark=True, spark_master="yarn", spark_init_mode="connect", share_level="user",
                          kernel_name="yarn_connect", spark_home=SPARK_HOME, extra_spark_opts=SMALL,
                          config={"launch_timeout": LAUNCH_BOUND}).resolve()  # fmt: skip
    path = install(opts, kernels_dir / "yarn_connect", replace=True)
    data = json.loads((path / "kernel.json").read_text())
    data["env"].update(HADOOP_CONF_DIR=str(yarn_lab.conf_dir), YARN_CONF_DIR=str(yarn_lab.conf_dir))
    (path / "kernel.json").write_text(json.dumps(data))
    km = managers("yarn_connect", engine_idle_timeout=5.0)
    await km.start_kernel(env=env(KERNEL_USERNAME="yarnconnect"))
    out, reply = await execute(km, "print('n', spark.range(100).count())", timeout=CELL_BOUND)
    assert reply["status"] == "ok" and out.strip().endswith("n 100"), out
    info = await until(lambda: (km.provisioner.spark or {}).get("state") == "ready" and km.provisioner.spark)
    assert info["master"] == "yarn" and info["app_id"].startswith("application_")
    (app,) = yarn_lab.apps(applicationTags=info["engine"].lower())
    assert app["id"] == info["app_id"] and app["name"] == f"sg-engine-{info['engine']}"
    assert "spark_gateway_engine" in app["applicationTags"] and km.kernel_id not in app["applicationTags"]
    await km.shutdown_kernel()
    final = await ended(yarn_lab, lab, info["app_id"])
    assert final["state"] == "FINISHED", final
