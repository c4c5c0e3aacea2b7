"""Spark kernels through the provisioner over SSH, on a real standalone cluster (testlab/spark_cluster.py).

YARN client mode against a real ResourceManager is in tests/test_yarn.py; here, the exact spark-submit command a
YARN spec runs and that an unreachable ResourceManager fails a start fast, with spark-submit's error in the message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import re
import shlex
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager

from spark_gateway import yarn
from spark_gateway.specs import SpecOptions, install
from testlab.hostlab import HostLab, LabHost
from testlab.spark_cluster import SPARK_HOME, SparkCluster, python_without_pyspark, spark_distribution
from tests.conftest import env, execute, gateway_config, kernel_processes

pytestmark = pytest.mark.asyncio

YARN_SITE = """<?xml version="1.0"?>
<configuration>
  <property><name>yarn.resourcemanager.address</name><value>127.0.0.1:9</value></property>
  <property><name>yarn.resourcemanager.connect.max-wait.ms</name><value>2000</value></property>
  <property><name>yarn.resourcemanager.connect.retry-interval.ms</name><value>500</value></property>
</configuration>
"""
CORE_SITE = """<?xml version="1.0"?>
<configuration>
  <property><name>ipc.client.connect.max.retries</name><value>0</value></property>
</configuration>
"""
PWNED = "/tmp/sg-pwned-spark"
LAB_USER = "sgspark"  # exists only inside one lab host (a private /etc/passwd there)


@pytest.fixture(scope="module")
def spark_specs(kernels_dir: Path, spark_cluster: SparkCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Spark kernelspecs (rendered from kernelspecs/ssh_python_spark by spark_gateway.specs) in `kernels_dir`."""
    work = tmp_path_factory.mktemp("spark")
    hadoop_conf = work / "hadoop-conf"
    hadoop_conf.mkdir()
    (hadoop_conf / "yarn-site.xml").write_text(YARN_SITE)
    (hadoop_conf / "core-site.xml").write_text(CORE_SITE)
    yarn_env = {"HADOOP_CONF_DIR": str(hadoop_conf), "SPARK_PRINT_LAUNCH_COMMAND": "1"}

    def spec(name: str, master: str, mode: str, env: dict[str, str] | None = None, **options: Any) -> None:
        options = {"spark_home": SPARK_HOME, **options}
        opts, _ = SpecOptions(spark=True, spark_master=master, spark_init_mode=mode, kernel_name=name,
                              **options).resolve()  # fmt: skip
        path = install(opts, kernels_dir / name, replace=True)
        if env:
            data = json.loads((path / "kernel.json").read_text())
            data["env"].update(env)
            (path / "kernel.json").write_text(json.dumps(data))

    spec("spark_lazy", spark_cluster.url, "lazy")
    spec("spark_eager_findspark", spark_cluster.url, "eager", interpreter=python_without_pyspark(work / "venv"),
         spark_home=str(spark_distribution(work / "spark-dist")))  # fmt: skip
    spec("spark_no_home", spark_cluster.url, "eager", spark_home="/nonexistent/spark")
    spec("yarn_eager", "yarn", "eager", env=yarn_env)
    spec("yarn_lazy", "yarn", "lazy", env=yarn_env)
    return kernels_dir


@pytest.fixture
def lab_user(lab: HostLab) -> Iterator[tuple[LabHost, str, Path]]:
    """A user that exists on lab host 1 only (bind-mounted passwd/group there), and a kernels dir it can read."""
    if lab.mode != "netns":
        pytest.skip("a user private to one host needs the lab's netns mode (root)")
    host = lab.hosts[0]
    base = Path(tempfile.mkdtemp(prefix="sg-imp-"))
    base.chmod(0o755)
    uid = next(i for i in range(50000, 60000) if f":{i}:" not in Path("/etc/passwd").read_text())
    home = base / "home"
    home.mkdir()
    os.chown(home, uid, uid)
    mounts: list[tuple[Path, str]] = []
    for name, line in (("passwd", f"{LAB_USER}:x:{uid}:{uid}::{home}:/bin/sh"), ("group", f"{LAB_USER}:x:{uid}:")):
        (base / name).write_text(Path(f"/etc/{name}").read_text() + line + "\n")
        (base / name).chmod(0o644)
        mounts.append((base / name, f"/etc/{name}"))
    python = Path(os.path.realpath(sys.executable))
    if python.is_relative_to("/root"):  # e.g. pyenv under root's 0700 home: give the host a /root others may enter
        top = Path("/root", python.relative_to("/root").parts[0])
        shown = base / "root"
        (shown / top.name).mkdir(parents=True)
        shown.chmod(0o711)
        mounts += [(top, str(shown / top.name)), (shown, "/root")]
    try:
        for source, target in mounts:
            host.run(["mount", "--rbind", str(source), target])
        yield host, LAB_USER, base
    finally:
        for _, target in reversed(mounts):
            host.run(["umount", "--recursive", target], check=False)
        shutil.rmtree(base, ignore_errors=True)


async def until(predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.2)
    return result


def log_text(km: AsyncKernelManager) -> str:
    return Path(km.provisioner.log_file).read_text(errors="replace")


def submit_args(log: str) -> list[str]:
    """The spark-submit arguments of the `Spark Command:` line (SPARK_PRINT_LAUNCH_COMMAND=1) in a kernel log."""
    line = next(line for line in log.splitlines() if line.startswith("Spark Command:"))
    words = shlex.split(line)
    return words[words.index("org.apache.spark.deploy.SparkSubmit") + 1 :]


def without_yarn_confs(args: list[str], kernel_id: str) -> list[str]:
    """`args` less the confs the gateway adds to every YARN kernel (asserted present: one attempt, tags)."""
    args = list(args)
    for conf in (
        "spark.yarn.maxAppAttempts=1",
        f"spark.yarn.tags={yarn.GATEWAY_TAG},{yarn.gateway_tag(yarn.default_gateway_id())},{kernel_id}",
    ):
        i = args.index(conf)
        assert args[i - 1] == "--conf", args
        del args[i - 1 : i + 1]
    return args


async def test_lazy_and_eager_kernels_run_side_by_side(lab, managers, spark_cluster, spark_specs, caplog):
    """Lazy (ready before its session) and eager (session first, found by findspark) kernels share the cluster."""
    caplog.set_level(logging.INFO)
    host1, host2 = lab.hosts[0], lab.hosts[1]
    lazy, eager = managers("spark_lazy"), managers("spark_eager_findspark")
    note = "$(touch /tmp/sg-pwned-spark) `touch /tmp/sg-pwned-spark`; x'"
    extra = f"--conf spark.executor.memory=512m --conf {shlex.quote('spark.sg.note=' + note)} --executor-cores 1"
    await lazy.start_kernel(env=env(KERNEL_REMOTE_HOST=host1.name))
    assert lazy.provisioner.spark["state"] == "starting"  # ready at once: the JVM starts after the kernel
    await eager.start_kernel(env=env(KERNEL_REMOTE_HOST=host2.name, KERNEL_EXTRA_SPARK_OPTS=extra))
    assert eager.provisioner.spark["state"] == "ready"  # the session existed before the callback
    assert spark_cluster.app(eager.kernel_id)["state"] == "RUNNING"

    code = (
        "import json, socket, pyspark\n"
        "hosts = sorted(set(sc.parallelize(range(4), 2).map(lambda _: socket.gethostname()).collect()))\n"
        "total = spark.range(1000).selectExpr('sum(id)').first()[0]\n"
        "conf = [spark.conf.get(key, None) for key in ('spark.executor.memory', 'spark.sg.note')]\n"
        "print(json.dumps([hosts, total, sc.applicationId, sc.appName, *conf, pyspark.__file__]))"
    )
    (lazy_out, lazy_reply), (eager_out, eager_reply) = await asyncio.gather(execute(lazy, code), execute(eager, code))
    assert lazy_reply["status"] == eager_reply["status"] == "ok", (lazy_out, eager_out)
    results = {}
    for km, out in ((lazy, lazy_out), (eager, eager_out)):
        first, last = out.strip().splitlines()[0], out.strip().splitlines()[-1]
        hosts, total, app_id, app_name, memory, note_seen, pyspark_file = json.loads(last)
        results[km.kernel_id] = app_id
        app = spark_cluster.app(km.kernel_id)
        assert (app["id"], app["name"], app["state"], app["cores"]) == (app_id, km.kernel_id, "RUNNING", 1)
        assert app_name == km.kernel_id and total == 499500
        assert hosts == [lab.hosts[-1].hostname]  # the executors ran on the cluster's host
        assert first.startswith(f"Spark application {app_id} ({km.kernel_id}) on {spark_cluster.url}; Spark UI: http")
        info = await until(lambda km=km: km.provisioner.spark.get("state") == "ready" and km.provisioner.spark)
        assert info["app_id"] == app_id and first.endswith(info["ui_url"])
        assert (await km.provisioner.get_provisioner_info())["spark"] == info
        assert any(app_id in r.getMessage() and info["ui_url"] in r.getMessage() for r in caplog.records)
        assert f"application {app_id}" in log_text(km) and info["ui_url"] in log_text(km)
        if km is eager:
            assert (memory, note_seen) == ("512m", note)  # the client's options, verbatim
            assert pyspark_file.endswith("/spark-dist/python/pyspark/__init__.py")  # findspark, from SPARK_HOME
        else:
            assert (memory, note_seen) == (None, None)
    assert not os.path.exists(PWNED)

    await asyncio.gather(lazy.shutdown_kernel(), eager.shutdown_kernel())
    for km, host in ((lazy, host1), (eager, host2)):
        await until(lambda km=km: spark_cluster.app(km.kernel_id)["state"] == "FINISHED")
        await until(lambda km=km: not spark_cluster.executors(results[km.kernel_id]), timeout=30)
        assert kernel_processes(host, km.kernel_id) == []  # no driver JVM, no launcher


async def test_bad_extra_spark_opts_are_refused_before_anything_runs(lab, managers, spark_specs):
    host = lab.hosts[0]
    refused = {
        "$(touch /tmp/sg-pwned-spark)": "'$(touch' is not a spark-submit option",
        "--conf spark.executor.memory=1g; touch /tmp/sg-pwned-spark": "'touch' is not a spark-submit option",
        "--conf 'spark.a=1": "cannot be parsed (No closing quotation)",
        "--master local[*]": "may not contain --master",
        "--name=other": "may not contain --name",
        "--proxy-user bob": "may not contain --proxy-user",
        "--conf spark.app.name=other": "may not set spark.app.name",
        "--executor-memory": "--executor-memory needs a value",
        "--conf novalue": "--conf needs KEY=VALUE",
    }
    for opts, message in refused.items():
        km = managers("spark_lazy")
        with pytest.raises(Exception, match="KERNEL_EXTRA_SPARK_OPTS") as info:
            await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name, KERNEL_EXTRA_SPARK_OPTS=opts))
        assert info.value.status_code == 400 and message in str(info.value), (opts, str(info.value))
        assert kernel_processes(host, km.kernel_id) == []
    km = managers("spark_lazy", impersonation_enabled=True)
    with pytest.raises(Exception, match="is not a plain POSIX user name") as info:
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name, KERNEL_USERNAME="bob; id"))
    assert info.value.status_code == 400
    assert not os.path.exists(PWNED)


PY4J_PORT = "print(sc._gateway._gateway_client.get_thread_connection().socket.getsockname()[1])"
JVM_SLEEP = """
import sys, threading, time
main = threading.get_ident()

def in_the_jvm():
    frame = sys._current_frames()[main]
    while frame is not None and frame.f_code.co_name != "send_command":
        frame = frame.f_back
    return frame is not None

def report():
    while not in_the_jvm():
        time.sleep(0.01)
    print("in the JVM", flush=True)

threading.Thread(target=report).start()
sc._jvm.java.lang.Thread.sleep(3600000)
"""


async def test_interrupt_cancels_the_running_job_and_the_kernel_stays_usable(lab, managers, spark_specs):
    host = lab.hosts[0]
    km = managers("spark_lazy")
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    assert (await execute(km, "print(spark.range(3).count())"))[0].strip().endswith("3")
    py4j_port = (await execute(km, PY4J_PORT))[0]
    ui = await until(lambda: km.provisioner.spark.get("ui_url"))
    api = f"http://{host.address}:{ui.rsplit(':', 1)[1]}/api/v1/applications/{km.provisioner.spark['app_id']}/jobs"

    def jobs(status: str) -> list[int]:
        # The UI's first REST call initialises its REST layer (Jersey): seconds on a loaded machine
        try:
            with urllib.request.urlopen(f"{api}?status={status}", timeout=30) as reply:
                return [job["jobId"] for job in json.loads(reply.read())]
        except TimeoutError:
            return []  # no answer yet: `until` asks again within its own bound

    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        msg_id = kc.execute("sc.parallelize([0], 1).foreach(lambda _: __import__('time').sleep(3600))")
        (job,) = await until(lambda: jobs("running"))
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert (reply["content"]["status"], reply["content"]["ename"]) == ("error", "KeyboardInterrupt")
        assert job in await until(lambda: jobs("failed"))  # cancelled, no longer running
        assert job not in jobs("running")
    finally:
        kc.stop_channels()
    assert "cancelled the Spark jobs of" in log_text(km)
    # The cell got its KeyboardInterrupt after the JVM answered, not inside py4j's socket read, where py4j tears
    # its connections down (the next JVM call could then fail with Py4JNetworkError).
    assert (await execute(km, PY4J_PORT))[0] == py4j_port
    out, reply = await execute(km, "print('after', spark.range(7).count())")
    assert reply["status"] == "ok" and out.strip() == "after 7"

    # A JVM call that is no Spark job goes on after an interrupt (cancelling jobs cannot end it); a second
    # interrupt ends the wait at once.
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        msg_id = kc.execute(JVM_SLEEP)
        while (await kc.get_iopub_msg(timeout=60))["content"].get("text") != "in the JVM\n":
            pass
        await km.interrupt_kernel()
        with pytest.raises(queue.Empty):
            await kc.get_shell_msg(timeout=3)
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert (reply["content"]["status"], reply["content"]["ename"]) == ("error", "KeyboardInterrupt")
    finally:
        kc.stop_channels()
    assert (await execute(km, "print(6 * 7)"))[0].strip() == "42"
    await km.shutdown_kernel()


async def test_yarn_client_command_and_unreachable_resource_manager(lab, managers, spark_specs, lab_user):
    """Eager: start_kernel fails fast with spark-submit's error. Lazy: ready, then `spark` raises that error.
    The eager kernel impersonates the lab user: it runs as that user (sudo), without --proxy-user."""
    host, user, base = lab_user
    spec = shutil.copytree(spark_specs / "yarn_eager", base / "kernels" / "yarn_eager")
    data = json.loads((spec / "kernel.json").read_text())
    conf = shutil.copytree(data["env"]["HADOOP_CONF_DIR"], base / "hadoop-conf")
    data["env"]["HADOOP_CONF_DIR"] = str(conf)
    data["argv"] = [a.replace(str(spark_specs / "yarn_eager"), str(spec)) for a in data["argv"]]
    (spec / "kernel.json").write_text(json.dumps(data))
    for path in [base / "kernels", *sorted((base / "kernels").rglob("*")), conf, *conf.iterdir()]:
        path.chmod(path.stat().st_mode | (0o755 if path.is_dir() else 0o644))
    eager = AsyncKernelManager(kernel_name="yarn_eager", config=gateway_config(lab, impersonation_enabled=True),
                               kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(base / "kernels")]))  # fmt: skip
    lazy = managers("yarn_lazy")
    extra = "--conf spark.executor.memory=1g --num-executors 2"
    eager_start, lazy_start = await asyncio.gather(
        eager.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name, KERNEL_EXTRA_SPARK_OPTS=extra, KERNEL_USERNAME=user)),
        lazy.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name)),
        return_exceptions=True,
    )
    assert lazy_start is None
    assert isinstance(eager_start, Exception) and eager_start.status_code == 500
    message = str(eager_start)
    assert "cannot create the SparkSession (eager mode): java.net.ConnectException" in message
    assert "localhost:9 failed on connection exception" in message  # Hadoop names 127.0.0.1 so
    assert without_yarn_confs(submit_args(log_text(eager)), eager.kernel_id) == [
        "--master", "yarn", "--deploy-mode", "client", "--conf", "spark.executor.memory=1g",
        "--name", eager.kernel_id, "--num-executors", "2", "pyspark-shell",
    ]  # fmt: skip
    assert kernel_processes(host, eager.kernel_id) == []

    failed = await until(lambda: lazy.provisioner.spark.get("state") == "failed" and lazy.provisioner.spark)
    assert failed["error"].startswith("java.net.ConnectException")
    out, reply = await execute(lazy, "spark.range(1).count()")
    assert reply["status"] == "error" and reply["ename"] == "SparkSessionError"
    assert "the SparkSession could not be created: java.net.ConnectException" in out
    out, reply = await execute(lazy, "print(6 * 7)")  # the kernel itself works
    assert out.strip() == "42"
    assert without_yarn_confs(submit_args(log_text(lazy)), lazy.kernel_id) == [
        "--master", "yarn", "--deploy-mode", "client", "--name", lazy.kernel_id, "pyspark-shell",
    ]  # fmt: skip
    await lazy.shutdown_kernel()


async def test_missing_spark_home_fails_the_start_at_once(lab, managers, spark_specs):
    host = lab.hosts[0]
    km = managers("spark_no_home")
    with pytest.raises(Exception, match="SPARK_HOME=/nonexistent/spark does not exist on") as info:
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    assert info.value.status_code == 500 and "exit status 1" in str(info.value)


async def test_impersonation_runs_the_kernel_as_the_user_with_sudo(lab, lab_user):
    """Not YARN: the gateway runs run.sh under `sudo -u KERNEL_USERNAME`; the driver JVM is the user's too."""
    host, user, base = lab_user
    opts, _ = SpecOptions(spark=True, spark_master="local[1]", spark_home=SPARK_HOME, spark_init_mode="eager",
                          kernel_name="spark_local").resolve()  # fmt: skip
    install(opts, base / "kernels" / "spark_local")
    km = AsyncKernelManager(kernel_name="spark_local", config=gateway_config(lab, impersonation_enabled=True),
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(base / "kernels")]))  # fmt: skip
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name, KERNEL_USERNAME=user))
    try:
        out, reply = await execute(km, "import getpass; print(getpass.getuser(), spark.range(3).count())")
        assert reply["status"] == "ok" and out.strip().splitlines()[-1] == f"{user} 3"
        programs: dict[int, set[str]] = {}
        for pid, cmd in kernel_processes(host, km.kernel_id):
            name = re.sub(r"^python[\d.]*$", "python", Path(cmd.split()[0]).name)  # python, python3, python3.11
            programs.setdefault(Path(f"/proc/{pid}").stat().st_uid, set()).add(name)
        uid = (base / "home").stat().st_uid
        assert programs[0] == {"sudo"} and {"python", "java"} <= programs[uid] and set(programs) == {0, uid}
    finally:
        await km.shutdown_kernel()
    assert kernel_processes(host, km.kernel_id) == []
