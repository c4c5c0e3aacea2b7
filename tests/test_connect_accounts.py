"""Group- and server-level Spark Connect engines under impersonation, on a real lab host with real local accounts.

Lab host 1 gets `sggw` (the gateway's SSH login, which may `sudo -u` the others), `sgengine` (the engine account:
`engine_account`), `alice` and `bob` (primary group `team`) and `carol` (her own group). Kernels run as their users;
group- and server-level engines run as `sgengine`, started by the gateway, and their token reaches only the kernels
the gateway granted (the engine's socket checks the caller's uid). Engines run `local[1]`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from jupyter_client import AsyncKernelManager

from spark_gateway.specs import SpecOptions, install
from testlab.hostlab import HostLab
from testlab.lab_accounts import Accounts, lab_accounts
from testlab.spark_cluster import SPARK_HOME
from tests.conftest import env, execute, kernel_managers
from tests.test_connect import LIGHT, session_info, with_suppressed_kill

pytestmark = pytest.mark.asyncio

GATEWAY, ENGINE = "sggw", "sgengine"
USERS = ["alice", "bob", "carol", ENGINE]
GROUPS = {"alice": "team", "bob": "team"}
SCRIPTS = Path(__file__).resolve().parent.parent / "kernel-launchers" / "python" / "scripts"
PROBE = """
import json, socket, sys
sys.path[:0] = [sys.argv[2], sys.argv[3]]
import spark_connect
from pathlib import Path
print(json.dumps(spark_connect.request(Path(sys.argv[1]), {"op": "attach", "kernel": "intruder-kernel"})))
"""


def engines_on(accounts: Accounts) -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, cmd in accounts.host.processes() if "spark_connect.py serve" in cmd or
            "SparkConnectServer" in cmd]  # fmt: skip


@pytest.fixture(scope="module")
def accounts(lab: HostLab) -> Iterator[Accounts]:
    """The accounts, and connect-mode specs everyone can read: `connect_group` and `connect_server` (local[1])."""
    if lab.mode != "netns":
        pytest.skip("accounts private to one host need the lab's netns mode (root)")
    with lab_accounts(lab.hosts[0], GATEWAY, USERS, lab.dir / "authorized_keys", groups=GROUPS) as made:
        kernels = made.base / "kernels"
        for name, level in (("connect_group", "group"), ("connect_server", "server")):
            opts, _ = SpecOptions(spark=True, spark_master="local[1]", spark_init_mode="connect", share_level=level,
                                  kernel_name=name, spark_home=SPARK_HOME,
                                  extra_spark_opts=LIGHT).resolve()  # fmt: skip
            install(opts, kernels / name)
        for path in sorted(kernels.rglob("*")) + [kernels]:
            path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
        try:
            yield made
        finally:
            for pid, _cmd in engines_on(made):
                with_suppressed_kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 40
            while engines_on(made) and time.monotonic() < deadline:
                time.sleep(0.5)
            for pid, _cmd in engines_on(made):
                with_suppressed_kill(pid, signal.SIGKILL)
            for uid in made.uids.values():
                shutil.rmtree(f"/tmp/spark_gateway-engines-{uid}-{made.host.hostname}", ignore_errors=True)


@pytest_asyncio.fixture
async def as_gateway(lab: HostLab, accounts: Accounts) -> Any:
    """Kernel managers of a gateway that logs in as sggw, impersonates, and runs shared engines as sgengine."""
    options = {"remote_user": GATEWAY, "impersonation_enabled": True, "remote_hosts": [accounts.host.name],
               "engine_account": ENGINE, "engine_idle_timeout": 20.0}  # fmt: skip
    async with kernel_managers(lab, accounts.base / "kernels", **options) as make:
        yield make


async def start(km: AsyncKernelManager, accounts: Accounts, user: str) -> None:
    await km.start_kernel(env=env(KERNEL_USERNAME=user, KERNEL_REMOTE_HOST=accounts.host.name))


def engine_dir(accounts: Accounts, key: str) -> Path:
    return Path(f"/tmp/spark_gateway-engines-{accounts.uids[ENGINE]}-{accounts.host.hostname}") / key


def as_user(accounts: Accounts, user: str, *argv: str) -> Any:
    return accounts.host.run(["runuser", "-u", user, "--", *argv], check=False, timeout=60)


async def test_group_level_engines_are_shared_by_a_group_and_run_as_the_engine_account(accounts, as_gateway):
    """alice and bob (group team) share one engine application, each with a session of their own; carol (another
    group) gets another engine; both run as sgengine, and the team's engine answers no uid it was not granted."""
    a, b, c = as_gateway("connect_group"), as_gateway("connect_group"), as_gateway("connect_group")
    await start(a, accounts, "alice")
    await start(b, accounts, "bob")
    await start(c, accounts, "carol")
    ia, ib, ic = await session_info(a), await session_info(b), await session_info(c)

    assert ia["engine"] == ib["engine"] and ia["engine"].startswith("group-team-"), (ia, ib)
    assert ia["app_id"] == ib["app_id"] and ia["session_id"] != ib["session_id"]
    assert ic["engine"].startswith("group-carol-") and ic["app_id"] != ia["app_id"]
    assert {ia["engine_user"], ib["engine_user"], ic["engine_user"]} == {ENGINE}
    out, reply = await execute(a, "%spark")
    assert f"on engine {ia['engine']} (group level, as {ENGINE} on" in out, out
    jvms = [pid for pid, cmd in engines_on(accounts) if "SparkConnectServer" in cmd and ia["engine"] in cmd]
    assert jvms and {Path(f"/proc/{pid}").stat().st_uid for pid in jvms} == {accounts.uids[ENGINE]}

    out, reply = await execute(a, "spark.range(4).createOrReplaceTempView('ours'); print(spark.table('ours').count())")
    assert reply["status"] == "ok" and out.strip().endswith("4"), out
    out, reply = await execute(b, "print('visible', spark.catalog.tableExists('ours'))")
    assert reply["status"] == "ok" and out.strip().endswith("visible False"), out  # same engine, another session

    # The engine's secrets: its token file is sgengine's alone, and its socket refuses carol (not granted).
    team = engine_dir(accounts, ia["engine"])
    denied = as_user(accounts, "alice", "cat", str(team / "token"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    shared = str(SCRIPTS.parent.parent / "shared" / "scripts")
    probe = as_user(accounts, "carol", sys.executable, "-c", PROBE, str(team), str(SCRIPTS), shared)
    reply = json.loads(probe.stdout.strip().splitlines()[-1])
    assert reply["ok"] is False and reply["state"] == "refused" and "not granted" in reply["error"], reply
    assert "token" not in reply
    for km in (a, b, c):
        await km.shutdown_kernel()


async def test_server_level_engine_is_shared_by_users_of_different_groups(accounts, as_gateway):
    """alice (team) and carol share one server-level engine run as sgengine; their sessions stay private."""
    a, c = as_gateway("connect_server"), as_gateway("connect_server")
    await start(a, accounts, "alice")
    await start(c, accounts, "carol")
    ia, ic = await session_info(a), await session_info(c)
    assert ia["engine"] == ic["engine"] and ia["engine"].startswith("server-spec-")
    assert ia["app_id"] == ic["app_id"] and ia["session_id"] != ic["session_id"]
    assert ia["engine_user"] == ic["engine_user"] == ENGINE
    out, reply = await execute(c, "%spark")
    assert f"(server level, as {ENGINE} on" in out, out
    out, reply = await execute(a, "spark.range(2).createOrReplaceTempView('alices'); print('made')")
    assert reply["status"] == "ok", out
    out, reply = await execute(c, "print('visible', spark.catalog.tableExists('alices'))")
    assert reply["status"] == "ok" and out.strip().endswith("visible False"), out
    # A kernel's session id is in its user's own private directory, not the shared engine's.
    mine = Path(f"/tmp/spark_gateway-engines-{accounts.uids['alice']}-{accounts.host.hostname}/sessions")
    assert (mine / a.kernel_id).read_text().strip() == ia["session_id"]
    assert mine.stat().st_uid == accounts.uids["alice"] and mine.stat().st_mode & 0o077 == 0

    # The engine's JVM dies: its kernels cannot start an engine of sgengine themselves, so its supervisor starts a
    # new JVM, and each kernel's next cell says why and runs on it.
    jvm = ia["jvm_pid"]
    os.kill(next(pid for pid, cmd in engines_on(accounts) if "SparkConnectServer" in cmd and ia["engine"] in cmd),
            signal.SIGKILL)  # fmt: skip
    out, reply = await execute(c, "print('counted', spark.range(5).count())", timeout=300)
    assert reply["status"] == "ok" and "counted 5" in out, out
    assert f"The Spark Connect engine {ia['engine']} is gone (its JVM (pid {jvm}) killed by signal 9" in out, out
    out, reply = await execute(a, "print('app', spark.conf.get('spark.app.id'))", timeout=300)
    assert reply["status"] == "ok" and "is gone" in out and f"app {ia['app_id']}" not in out, out
    state = json.loads((engine_dir(accounts, ia["engine"]) / "engine.json").read_text())
    assert state["pid"] == ia["engine_pid"] and state["jvm_pid"] != jvm and state["state"] == "ready", state
    for km in (a, c):
        await km.shutdown_kernel()


async def test_shared_levels_without_an_engine_account_are_refused_before_any_host(accounts, as_gateway):
    km = as_gateway("connect_server", engine_account="", remote_hosts=["no-such-host.invalid"])
    with pytest.raises(Exception, match="needs an engine account: set c.DistributedProvisioner.engine_account"):
        await km.start_kernel(env=env(KERNEL_USERNAME="alice"))
