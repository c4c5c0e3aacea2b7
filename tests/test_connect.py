"""Spark Connect kernels (`--spark-init-mode connect`) on engines shared by level, on real hosts and real Spark.

User-level engines run on the shared standalone cluster (one core per application: at most two at once there);
the kernel-level engine runs `local[1]`, so this module holds at most three engine JVMs plus one executor each.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import AsyncKernelManager

from spark_gateway import engines
from spark_gateway.specs import SpecOptions, install
from testlab.hostlab import HostLab, LabHost
from testlab.spark_cluster import SPARK_HOME, SparkCluster
from tests.conftest import env, execute

pytestmark = pytest.mark.asyncio
LIGHT = "--conf spark.cores.max=1 --conf spark.executor.memory=512m --driver-memory 512m"
SLEEP_UDF = (
    "from pyspark.sql.functions import udf\n"
    "nap = udf(lambda x: __import__('time').sleep({seconds}) or x, 'long')\n"
    "print('result', spark.range(1).select(nap('id')).collect()[0][0])"
)


def engine_processes(lab: HostLab) -> list[tuple[LabHost, int, str]]:
    """Every engine supervisor and Connect server JVM on the lab's hosts."""
    return [
        (host, pid, cmd)
        for host in lab.hosts
        for pid, cmd in host.processes()
        if "spark_connect.py serve" in cmd or "SparkConnectServer" in cmd
    ]


@pytest.fixture(scope="module")
def connect_specs(kernels_dir: Path, spark_cluster: SparkCluster, lab: HostLab) -> Iterator[Path]:
    """Connect-mode specs: `connect_user` (standalone, user level), `connect_kernel` (local[1], kernel level),
    `connect_user_local` (local[1], user level). Every engine left at the end is stopped (its supervisor stops its
    JVM)."""
    specs = (("connect_user", spark_cluster.url, "user"), ("connect_kernel", "local[1]", "kernel"),
             ("connect_user_local", "local[1]", "user"))  # fmt: skip
    for name, master, level in specs:
        opts, _ = SpecOptions(spark=True, spark_master=master, spark_init_mode="connect", share_level=level,
                              kernel_name=name, spark_home=SPARK_HOME, extra_spark_opts=LIGHT).resolve()  # fmt: skip
        install(opts, kernels_dir / name, replace=True)
    yield kernels_dir
    for _host, pid, cmd in engine_processes(lab):
        if "spark_connect.py serve" in cmd:
            with_suppressed_kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 40
    while engine_processes(lab) and time.monotonic() < deadline:
        time.sleep(0.5)
    for _host, pid, _cmd in engine_processes(lab):
        with_suppressed_kill(pid, signal.SIGKILL)


def with_suppressed_kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


async def until(predicate: Any, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.3)
    return result


async def session_info(km: AsyncKernelManager) -> dict[str, Any]:
    """The kernel's `%spark` facts as JSON, once its session is ready (the kernel waits for its engine)."""
    out, reply = await execute(km, "spark.range(1).count()", timeout=300)
    assert reply["status"] == "ok", out
    info = await until(lambda: (km.provisioner.spark or {}).get("state") == "ready" and km.provisioner.spark)
    return info


async def test_user_level_engine_is_shared_sessions_are_private(lab, managers, spark_cluster, connect_specs):
    """Two kernels of alice share one engine (one application), each with its own session (temp views); bob's
    kernel gets another engine; interrupting one kernel's job leaves its neighbour's running on the same engine."""
    a1, a2, b1 = managers("connect_user"), managers("connect_user"), managers("connect_user")
    await a1.start_kernel(env=env(KERNEL_USERNAME="alice"))
    assert a1.provisioner.spark["state"] == "starting"  # ready before its engine
    out, reply = await execute(a1, "%spark", timeout=30)
    assert reply["status"] == "ok" and "(user level): starting" in out
    info1 = await session_info(a1)
    await a2.start_kernel(env=env(KERNEL_USERNAME="alice"))
    assert a2.provisioner.host == a1.provisioner.host  # sent to the engine's host
    await b1.start_kernel(env=env(KERNEL_USERNAME="bob"))
    info2, info_b = await session_info(a2), await session_info(b1)

    assert info1["engine"] == info2["engine"] and info1["engine"].startswith("user-alice-")
    assert info1["app_id"] == info2["app_id"] and info1["session_id"] != info2["session_id"]
    assert info_b["engine"].startswith("user-bob-") and info_b["app_id"] != info1["app_id"]
    apps = {a["id"]: a for a in spark_cluster.state()["activeapps"]}
    assert apps[info1["app_id"]]["name"] == f"sg-engine-{info1['engine']}"
    assert apps[info_b["app_id"]]["name"] == f"sg-engine-{info_b['engine']}"
    out, reply = await execute(a1, "%spark")
    assert f"Spark Connect session {info1['session_id']} on engine {info1['engine']} (user level" in out
    assert info1["app_id"] in out and "Spark UI: http" in out

    out, reply = await execute(a1, "spark.range(5).createOrReplaceTempView('mine'); print(spark.table('mine').count())")
    assert reply["status"] == "ok" and out.strip().endswith("5"), out
    out, reply = await execute(a2, "print(spark.catalog.tableExists('mine'))")
    assert out.strip().endswith("False"), out  # same engine, another session

    # Interrupt a1's endless job while a2's 25 s job runs on the same engine: a2's job finishes normally.
    k1, k2 = a1.client(), a2.client()
    k1.start_channels()
    k2.start_channels()
    try:
        await asyncio.gather(k1.wait_for_ready(timeout=60), k2.wait_for_ready(timeout=60))
        neighbour = k2.execute(SLEEP_UDF.format(seconds=25))
        victim = k1.execute(SLEEP_UDF.format(seconds=3600))
        await asyncio.sleep(8)  # both jobs are running on the engine
        began = time.monotonic()
        await a1.interrupt_kernel()
        reply = await k1.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == victim
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - began < 20
        reply = await k2.get_shell_msg(timeout=120)
        assert reply["parent_header"]["msg_id"] == neighbour and reply["content"]["status"] == "ok", reply["content"]
    finally:
        k1.stop_channels()
        k2.stop_channels()
    out, reply = await execute(a1, "print('after', spark.table('mine').count())")
    assert reply["status"] == "ok" and out.strip().endswith("after 5"), out
    await asyncio.gather(*(km.shutdown_kernel() for km in (a1, a2, b1)))


async def test_kernel_level_session_survives_restart_and_engine_stops_when_idle(lab, managers, connect_specs):
    """A kernel-level engine (local[1]) is the kernel's own; a temp view survives restart_kernel (same session on
    the same engine); once the kernel is gone the engine stops after the idle timeout, leaving nothing on the host."""
    km = managers("connect_kernel", engine_idle_timeout=6.0)
    await km.start_kernel(env=env(KERNEL_USERNAME="alice"))
    info = await session_info(km)
    assert info["engine"] == f"kernel-{km.kernel_id}" and info["master"] == "local[1]"
    assert info["share_level"] == "kernel"
    out, reply = await execute(km, "spark.range(3).createOrReplaceTempView('kept'); print(spark.table('kept').count())")
    assert reply["status"] == "ok" and out.strip().endswith("3"), out
    host = next(h for h in lab.hosts if h.name == km.provisioner.host)

    await km.restart_kernel()
    out, reply = await execute(km, "print('kept', spark.table('kept').count())", timeout=120)
    assert reply["status"] == "ok" and out.strip().endswith("kept 3"), out
    again = await until(lambda: (km.provisioner.spark or {}).get("state") == "ready" and km.provisioner.spark)
    assert (again["session_id"], again["app_id"]) == (info["session_id"], info["app_id"])

    await km.shutdown_kernel()
    key = info["engine"]
    await until(lambda: not [p for p in host.processes() if key in p[1] or info["app_id"] in p[1]], timeout=60)
    leftovers = host.run(["sh", "-c", "ls -d /tmp/spark_gateway-engines-*/" + key + " 2>/dev/null || true"])
    assert leftovers.stdout.strip() == ""


async def test_engine_refuses_clients_without_its_token(lab, managers, connect_specs):
    """A running engine: a client on its host without the token is refused (UNAUTHENTICATED), and it is not
    reachable from the network at all (bound to loopback). An engine that dies is reported, and replaced."""
    km = managers("connect_kernel", engine_idle_timeout=5.0)
    await km.start_kernel(env=env(KERNEL_USERNAME="alice"))
    info = await session_info(km)
    host = next(h for h in lab.hosts if h.name == km.provisioner.host)
    state = json.loads(
        host.run(["sh", "-c", f"cat /tmp/spark_gateway-engines-*-{host.hostname}/{info['engine']}/engine.json"]).stdout
    )
    port = int(state["port"])
    probe = (
        "import sys\nfrom pyspark.sql.connect.session import SparkSession\n"
        "try:\n"
        "    SparkSession.builder.remote(sys.argv[1]).create().range(1).count()\n"
        "    print('ACCEPTED')\n"
        "except Exception as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    for url in (f"sc://localhost:{port}", f"sc://localhost:{port}/;token=not-the-token"):
        res = host.run([sys.executable, "-c", probe, url], timeout=120)
        assert "REFUSED" in res.stdout and "UNAUTHENTICATED" in res.stdout, res.stdout + res.stderr
    for address in (host.address,):
        res = subprocess.run(["python3", "-c", f"import socket; socket.create_connection(('{address}', {port}), 3)"],
                             capture_output=True, text=True)  # fmt: skip
        assert res.returncode != 0 and "refused" in res.stderr.lower(), res.stderr

    # The engine dies: the kernel's next cell says why, and `spark` is a session on a new engine.
    host.run(["kill", "-9", str(state["jvm_pid"])])
    out, reply = await execute(km, "print('again', spark.range(4).count())", timeout=300)
    assert reply["status"] == "ok" and out.strip().endswith("again 4"), out
    assert f"The Spark Connect engine {info['engine']} is gone (its JVM" in out, out
    await km.shutdown_kernel()


def engine_files(host: LabHost, key: str) -> tuple[dict[str, Any], str]:
    """The engine's engine.json and token on its host (read as root)."""
    where = f"/tmp/spark_gateway-engines-*-{host.hostname}/{key}"
    state = json.loads(host.run(["sh", "-c", f"cat {where}/engine.json"]).stdout)
    return state, host.run(["sh", "-c", f"cat {where}/token"]).stdout.strip()


SESSION_PROBE = (
    "import sys\nfrom pyspark.sql.connect.session import SparkSession\n"
    "try:\n"
    "    print('EXISTS', SparkSession.builder.remote(sys.argv[1]).create().catalog.tableExists(sys.argv[2]))\n"
    "except Exception as exc:\n"
    "    print('FAILED', exc)\n"
)


async def test_shutdown_releases_the_session_and_ends_a_kernel_level_engine(lab, managers, connect_specs):
    """A kernel shut down (not restarted) releases its session on the shared engine (its temp view is gone for a
    client giving its session id) and forgets its id; a kernel-level engine ends with its kernel, not after
    engine_idle_timeout."""
    k1, k2 = (managers("connect_user_local", engine_idle_timeout=20.0) for _ in range(2))
    await k1.start_kernel(env=env(KERNEL_USERNAME="dave"))
    i1 = await session_info(k1)
    await k2.start_kernel(env=env(KERNEL_USERNAME="dave"))
    i2 = await session_info(k2)
    assert i1["engine"] == i2["engine"] and i1["session_id"] != i2["session_id"]
    out, reply = await execute(k1, "spark.range(2).createOrReplaceTempView('released'); print('made')")
    assert reply["status"] == "ok", out
    host = next(h for h in lab.hosts if h.name == k1.provisioner.host)
    state, token = engine_files(host, i1["engine"])
    url = f"sc://localhost:{state['port']}/;token={token};session_id={i1['session_id']};user_id={i1['user_id']}"
    probe = host.run([sys.executable, "-c", SESSION_PROBE, url, "released"], timeout=120)
    assert "EXISTS True" in probe.stdout, probe.stdout + probe.stderr  # the probe reaches k1's session
    sessions = host.run(["sh", "-c", f"ls /tmp/spark_gateway-engines-*-{host.hostname}/sessions/"]).stdout.split()
    assert k1.kernel_id in sessions

    await k1.shutdown_kernel()
    probe = host.run([sys.executable, "-c", SESSION_PROBE, url, "released"], timeout=120)
    assert "EXISTS True" not in probe.stdout and "SESSION_CLOSED" in probe.stdout, probe.stdout + probe.stderr
    sessions = host.run(["sh", "-c", f"ls /tmp/spark_gateway-engines-*-{host.hostname}/sessions/"]).stdout.split()
    assert k1.kernel_id not in sessions and k2.kernel_id in sessions
    out, reply = await execute(k2, "print('still', spark.range(3).count())")  # the neighbour's session goes on
    assert reply["status"] == "ok" and out.strip().endswith("still 3"), out
    await k2.shutdown_kernel()

    km = managers("connect_kernel", engine_idle_timeout=600.0)
    await km.start_kernel(env=env(KERNEL_USERNAME="dave"))
    info = await session_info(km)
    host = next(h for h in lab.hosts if h.name == km.provisioner.host)
    assert [p for p in host.processes() if info["engine"] in p[1]]
    await km.shutdown_kernel()
    await until(lambda: not [p for p in host.processes() if info["engine"] in p[1]], timeout=90)


async def test_a_kernel_joining_an_engine_as_it_stops_gets_a_working_engine(lab, managers, connect_specs):
    """The engine's stop decision and a kernel's attachment are taken under one lock: a kernel that joins while its
    engine stops for idleness (the lock held meanwhile, so both wait on it) either keeps that engine or gets a new
    one, never a dead port; a kernel that joins an engine already stopping gets a new one."""
    k1 = managers("connect_user_local", engine_idle_timeout=3.0)
    await k1.start_kernel(env=env(KERNEL_USERNAME="erin"))
    i1 = await session_info(k1)
    host = next(h for h in lab.hosts if h.name == k1.provisioner.host)
    state, _ = engine_files(host, i1["engine"])
    lock = next(Path("/tmp").glob(f"spark_gateway-engines-*-{host.hostname}/{i1['engine']}")).parent
    await k1.shutdown_kernel()
    with open(lock / f".{i1['engine']}.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the supervisor cannot decide to stop, the new kernel cannot attach
        await asyncio.sleep(5)  # idle for longer than its timeout: the supervisor waits for the lock
        k2 = managers("connect_user_local", engine_idle_timeout=3.0)
        await k2.start_kernel(env=env(KERNEL_USERNAME="erin"))
        assert k2.provisioner.host == host.name
        await asyncio.sleep(3)  # its launcher waits for the lock too
    out, reply = await execute(k2, "print('joined', spark.range(5).count())", timeout=300)
    assert reply["status"] == "ok" and out.strip().endswith("joined 5"), out
    i2 = await session_info(k2)
    print("kernel joining at the stop decision:", "kept the engine" if i2["app_id"] == i1["app_id"] else "new engine")

    # An engine already stopping (its supervisor told to stop): a kernel joining it gets a new one.
    host.run(["kill", "-TERM", str(int(i2["engine_pid"]))])  # a pid of the host's namespace
    k3 = managers("connect_user_local", engine_idle_timeout=3.0)
    await k3.start_kernel(env=env(KERNEL_USERNAME="erin"))
    out, reply = await execute(k3, "print('new', spark.range(6).count())", timeout=300)
    assert reply["status"] == "ok" and out.strip().endswith("new 6"), out
    i3 = await session_info(k3)
    assert i3["app_id"] != i2["app_id"] and i3["engine_pid"] != i2["engine_pid"]
    await asyncio.gather(k2.shutdown_kernel(), k3.shutdown_kernel())


async def test_a_query_fails_promptly_with_the_reason_when_its_engine_dies(lab, managers, connect_specs):
    """The engine's JVM is killed while a cell's query runs: the cell fails within seconds (pyspark's retries are
    bounded, not its ~10 minutes of backoff) and says the engine went away, and why."""
    km = managers("connect_kernel", engine_idle_timeout=600.0)
    await km.start_kernel(env=env(KERNEL_USERNAME="alice"))
    info = await session_info(km)
    host = next(h for h in lab.hosts if h.name == km.provisioner.host)
    state, _ = engine_files(host, info["engine"])
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        msg_id = kc.execute(SLEEP_UDF.format(seconds=120))
        await asyncio.sleep(8)  # the query runs on the engine
        host.run(["kill", "-9", str(state["jvm_pid"])])
        reply = await kc.get_shell_msg(timeout=150)  # well below pyspark's default backoff (~10 minutes)
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "error"
        said = []
        while True:
            msg = await kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                said.append(msg["content"]["text"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        text = "".join(said)
        assert f"The Spark Connect engine {info['engine']} went away while the cell ran" in text, text
        assert f"its JVM (pid {state['jvm_pid']})" in text, text
    finally:
        kc.stop_channels()
    await km.shutdown_kernel()


async def test_share_keys_follow_the_level_and_the_options() -> None:
    argv = ["run.sh", engines.SHARE_FLAG, "user"]
    env = {"SPARK_OPTS": "--master local[1]"}
    a = engines.plan("k1", "alice", "spec", argv, env, "")
    assert a == engines.plan("k2", "alice", "spec", argv, env, "")
    assert a.key != engines.plan("k1", "bob", "spec", argv, env, "").key
    assert a.key != engines.plan("k1", "alice", "spec", argv, env, "--conf spark.x=1").key  # separate engine
    assert engines.plan("k1", "alice", "spec", ["run.sh", engines.SHARE_FLAG, "kernel"], env, "").key == "kernel-k1"
    server = ["run.sh", engines.SHARE_FLAG, "server"]
    assert engines.plan("k1", "alice", "s", server, env, "") == engines.plan("k2", "bob", "s", server, env, "")
    with pytest.raises(engines.EngineRefused, match="needs an engine account: set c.DistributedProvisioner.engine_acc"):
        engines.plan("k1", "alice", "s", server, env, "", impersonating=True)
    with pytest.raises(engines.EngineRefused, match="must not be root"):
        engines.plan("k1", "alice", "s", server, env, "", impersonating=True, engine_account="root")
    with pytest.raises(engines.EngineRefused, match="engine_account 'Bad Name' is not"):
        engines.plan("k1", "alice", "s", server, env, "", impersonating=True, engine_account="Bad Name")
    shared = engines.plan("k1", "alice", "s", server, env, "", impersonating=True, engine_account="sgengine")
    assert shared.account == "sgengine" and shared.exports(5)["GP_ENGINE_ACCOUNT"] == "sgengine"
    assert engines.plan("k1", "alice", "s", argv, env, "", impersonating=True, engine_account="sgengine").account == ""
    group = ["run.sh", engines.SHARE_FLAG, "group"]
    assert engines.plan("k1", "alice", "s", group, env, "", True, "sgengine", group="team").key.startswith(
        "group-team-"
    )
    assert engines.primary_group("root") == "root"
    assert engines.plan("k1", "root", "s", ["run.sh", engines.SHARE_FLAG, "group"], env, "").key.startswith(
        "group-root-"
    )
    with pytest.raises(engines.EngineRefused, match="no primary group"):
        engines.plan("k1", "no-such-user-here", "s", ["run.sh", engines.SHARE_FLAG, "group"], env, "")
    assert engines.parse_inventory("spark_connect.py serve --engine-key user-a-1\n") == {"user-a-1"}


async def test_convert_keeps_the_connect_mode_and_share_level(tmp_path: Path) -> None:
    from spark_gateway.specs import convert

    opts, _ = SpecOptions(spark=True, spark_master="local[*]", spark_init_mode="connect", share_level="server",
                          kernel_name="c", spark_home=SPARK_HOME).resolve()  # fmt: skip
    src = install(opts, tmp_path / "c")
    dest = convert(src, "yarn")
    spec = json.loads((dest / "kernel.json").read_text())
    argv = spec["argv"]
    assert argv[argv.index("--spark-context-initialization-mode") + 1] == "connect"
    assert argv[argv.index(engines.SHARE_FLAG) + 1] == "server"
    assert "--master yarn" in spec["env"]["SPARK_OPTS"] and (dest / "scripts" / "spark_connect.py").is_file()


async def test_gp_engine_dir_holds_a_private_engine_directory_per_account(tmp_path: Path, monkeypatch) -> None:
    """GP_ENGINE_DIR is shared like /tmp: each account's engines live in a directory of its own below it, and a
    directory there that another account could write (or that is not its own) is refused."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "kernel-launchers" / "python" / "scripts"))
    import spark_connect

    shared = tmp_path / "engines"
    shared.mkdir(mode=0o1777)
    monkeypatch.setenv("GP_ENGINE_DIR", str(shared))
    root = spark_connect.state_root()
    assert root.parent == shared and root.name.startswith(f"spark_gateway-engines-{os.geteuid()}-")
    assert root.stat().st_mode & 0o777 == 0o711
    assert spark_connect.engine_dir("user-alice-0123456789ab") == root / "user-alice-0123456789ab"
    root.chmod(0o777)  # writable by others: never used
    with pytest.raises(spark_connect.EngineError, match="only it may write"):
        spark_connect.state_root()
    with pytest.raises(spark_connect.EngineError, match="does not exist"):
        spark_connect.state_root(uid=os.geteuid() + 4242)  # another account's, not made by us
