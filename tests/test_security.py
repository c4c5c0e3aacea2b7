"""Issue 12 on real lab hosts with real local users: who kernels run as, and what they can reach.

A lab host gets three accounts (testlab/lab_accounts.py): `sggw`, the gateway's SSH login, which may `sudo -u`
`alice` and `bob` and nothing else (the operator's rule, README *Security model*), and the two notebook users.
The gateway connects as `sggw` with impersonation enabled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from jupyter_client import AsyncKernelManager

from spark_gateway.specs import SpecOptions, install
from testlab.gateway import write_spec
from testlab.hostlab import HostLab
from testlab.lab_accounts import Accounts, lab_accounts
from testlab.spark_cluster import SPARK_HOME
from tests.conftest import env, eventually, execute, kernel_managers, kernel_processes

pytestmark = pytest.mark.asyncio

GATEWAY = "sggw"
USERS = ["alice", "bob"]
YARN_SITE = """<?xml version="1.0"?>
<configuration>
  <property><name>yarn.resourcemanager.address</name><value>127.0.0.1:9</value></property>
  <property><name>yarn.resourcemanager.connect.max-wait.ms</name><value>2000</value></property>
  <property><name>yarn.resourcemanager.connect.retry-interval.ms</name><value>500</value></property>
</configuration>
"""


@pytest.fixture(scope="module")
def accounts(lab: HostLab) -> Iterator[Accounts]:
    """sggw, alice and bob on lab host 1, kernelspecs all of them can read, and a secret only sggw can."""
    if lab.mode != "netns":
        pytest.skip("accounts private to one host need the lab's netns mode (root)")
    with lab_accounts(lab.hosts[0], GATEWAY, USERS, lab.dir / "authorized_keys") as made:
        kernels = made.base / "kernels"
        write_spec(kernels / "ssh_python")
        conf = made.base / "hadoop-conf"
        conf.mkdir()
        (conf / "yarn-site.xml").write_text(YARN_SITE)
        opts, _ = SpecOptions(spark=True, spark_master="yarn", spark_home=SPARK_HOME, spark_init_mode="lazy",
                              kernel_name="yarn_lazy").resolve()  # fmt: skip
        spec = install(opts, kernels / "yarn_lazy") / "kernel.json"
        data = json.loads(spec.read_text())
        data["env"].update(HADOOP_CONF_DIR=str(conf), SPARK_PRINT_LAUNCH_COMMAND="1")
        spec.write_text(json.dumps(data))
        readable_by_all(kernels)
        secret = made.home(GATEWAY) / "secret"
        secret.write_text("the gateway's own secret\n")
        secret.chmod(0o600)
        os.chown(secret, made.uids[GATEWAY], made.uids[GATEWAY])
        yield made


def readable_by_all(kernels: Path) -> None:
    """Make a kernels directory readable (and its scripts runnable) by every account on the host."""
    for path in sorted(kernels.rglob("*")) + [kernels]:
        path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)


def impersonating(lab: HostLab, accounts: Accounts) -> contextlib.AbstractAsyncContextManager[Any]:
    """`kernel_managers` of `accounts`' kernelspecs, for a gateway that logs in as sggw to their host and
    impersonates."""
    options = {"remote_user": GATEWAY, "impersonation_enabled": True, "remote_hosts": [accounts.host.name]}
    return kernel_managers(lab, accounts.base / "kernels", **options)


@pytest_asyncio.fixture
async def as_gateway(lab: HostLab, accounts: Accounts) -> Any:
    """Kernel managers of a gateway that logs in as sggw and impersonates; kernels still up are shut down."""
    async with impersonating(lab, accounts) as make:
        yield make


def owners(accounts: Accounts, kernel_id: str) -> dict[str, set[str]]:
    """User name -> program names of every process of the kernel on the host (`ps -o user=,comm=`)."""
    pids = [str(pid) for pid, _ in kernel_processes(accounts.host, kernel_id)]
    assert pids, f"no process of kernel {kernel_id} on {accounts.host.name}"
    by_uid = {uid: name for name, uid in accounts.uids.items()} | {0: "root"}
    found: dict[str, set[str]] = {}
    for pid in pids:
        try:
            uid = Path(f"/proc/{pid}").stat().st_uid
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except FileNotFoundError:  # a short-lived one (spark-submit's scripts run several) ended since the listing
            continue
        found.setdefault(by_uid.get(uid, str(uid)), set()).add(re.sub(r"^python[\d.]*$", "python", comm))
    return found


async def start(km: AsyncKernelManager, accounts: Accounts, user: str | None, kernel_id: str | None = None,
                **extra: str) -> None:  # fmt: skip
    values = {"KERNEL_REMOTE_HOST": accounts.host.name, **extra}
    environment = {k: v for k, v in env(**values).items() if k != "KERNEL_USERNAME"}
    if user is not None:
        environment["KERNEL_USERNAME"] = user
    await km.start_kernel(env=environment, **({"kernel_id": kernel_id} if kernel_id else {}))


async def test_kernels_of_two_users_are_isolated_from_each_other_and_the_gateway(accounts, as_gateway):
    bob, alice = as_gateway(), as_gateway()
    await start(bob, accounts, "bob")
    await start(alice, accounts, "alice")
    assert owners(accounts, alice.kernel_id) == {"root": {"sudo"}, "alice": {"python"}}
    bobs_file = bob.provisioner.remote_connection_file
    assert bobs_file and Path(bobs_file).is_relative_to(accounts.home("bob"))
    code = (
        "import getpass\nprint(getpass.getuser())\n"
        f"for path in [{bobs_file!r}, {str(accounts.home(GATEWAY) / 'secret')!r}]:\n"
        "    try:\n        print(open(path).read())\n    except PermissionError:\n        print('denied', path)\n"
    )
    out, reply = await execute(alice, code)
    assert reply["status"] == "ok", out
    assert out.split() == ["alice", "denied", bobs_file, "denied", str(accounts.home(GATEWAY) / "secret")]


async def test_a_yarn_kernel_runs_as_its_user(accounts, as_gateway):
    """YARN specs too run under sudo -u (the JVM can then use nothing of the gateway account's), without --proxy-user
    (alice's JVM is alice to Hadoop; proxying would need her to hold the right to impersonate herself: see
    tests/test_yarn.py against a real ResourceManager)."""
    km = as_gateway("yarn_lazy")
    await start(km, accounts, "alice")
    log = Path(km.provisioner.log_file)

    def submitted() -> list[str]:
        return [line for line in log.read_text(errors="replace").splitlines() if line.startswith("Spark Command:")]

    assert await eventually(lambda: bool(submitted()), 60), log.read_text(errors="replace")
    assert "--proxy-user" not in submitted()[0]
    assert owners(accounts, km.kernel_id).keys() == {"root", "alice"}
    out, reply = await execute(km, "import getpass; print(getpass.getuser())")
    assert out.strip() == "alice"


@pytest.mark.parametrize(
    ("user", "status", "message"),
    [
        (GATEWAY, 403, "gateway's own account"),
        ("root", 403, "gateway's own account"),
        ("ROOT", 400, "plain POSIX user name"),
        ("root@EXAMPLE.COM", 400, "plain POSIX user name"),
        (" alice", 400, "plain POSIX user name"),
        ("\uff41lice", 400, "plain POSIX user name"),
        (None, 400, "KERNEL_USERNAME is required"),
        ("bob", 403, "listed in unauthorized_users"),
    ],
)
async def test_users_refused_before_any_host_is_used(accounts, as_gateway, user, status, message):
    km = as_gateway(unauthorized_users={"root", "Bob"})
    with pytest.raises(Exception, match=message) as info:
        await start(km, accounts, user)
    assert getattr(info.value, "status_code", None) == status
    assert km.provisioner is None or km.provisioner.host is None
    assert kernel_processes(accounts.host, km.kernel_id) == []


async def test_a_planted_log_symlink_is_not_followed(accounts, as_gateway):
    """GP_KERNEL_LOG_DIR shared like /tmp (sticky, world-writable): alice plants kernel-<id>.log -> a file of the
    gateway account before the start; the gateway must not write through it, nor show it in the start error."""
    shared = accounts.base / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    secret = accounts.home(GATEWAY) / "secret"
    before = secret.read_text()
    kernel_id = "planted-" + os.urandom(4).hex()
    link = shared / f"kernel-{kernel_id}.log"
    link.symlink_to(secret)
    os.chown(link, accounts.uids["alice"], accounts.uids["alice"], follow_symlinks=False)
    km = as_gateway(kernel_log_dir=str(shared))
    with pytest.raises(Exception, match="cannot create the kernel log") as info:
        await start(km, accounts, "bob", kernel_id=kernel_id)
    assert before not in str(info.value)
    assert secret.read_text() == before and link.is_symlink()
    assert kernel_processes(accounts.host, kernel_id) == []


async def test_the_default_log_directory_is_the_gateway_accounts_own(accounts, as_gateway):
    """Default: /tmp/spark_gateway-<SSH user>, 0700, owned by that account; one squatted by another user is refused."""
    folder = Path(f"/tmp/spark_gateway-{GATEWAY}")
    shutil.rmtree(folder, ignore_errors=True)
    try:
        km = as_gateway()
        await start(km, accounts, "alice")
        log = Path(km.provisioner.log_file)
        assert log.parent == folder and (folder.stat().st_mode & 0o777) == 0o700
        assert folder.stat().st_uid == log.stat().st_uid == accounts.uids[GATEWAY]
        await km.shutdown_kernel()
        shutil.rmtree(folder)
        folder.mkdir(mode=0o777)
        os.chown(folder, accounts.uids["alice"], accounts.uids["alice"])
        squatted = as_gateway()
        with pytest.raises(Exception, match="is not a directory of this account"):
            await start(squatted, accounts, "bob")
        assert list(folder.iterdir()) == []
    finally:
        shutil.rmtree(folder, ignore_errors=True)


FORGER = """
import os, sys, time
sys.path.insert(0, {scripts!r})
import server_listener as sl
kernel_id, address, key = sys.argv[1:4]
pid, pgid, path = int(os.environ["SG_FORGED_PID"]), int(os.environ["SG_FORGED_PGID"]), os.environ["SG_FORGED_FILE"]
ports = dict(shell_port=1, iopub_port=1, stdin_port=1, control_port=1, hb_port=1)
info = dict(ports, ip="0.0.0.0", key="k", transport="tcp", signature_scheme="hmac-sha256", kernel_name="")
sl.send_connection_info(address, key, kernel_id, sl.take_launch_token().decode(), dict(
    connection_info=info, pid=pid, pgid=pgid, hostname="forged", listener_port=1, listener_secret="00" * 32,
    connection_file=path, log_file=None))
time.sleep(600)
"""


def host_pid(global_pid: int) -> int:
    """The pid a process has inside its lab host's PID namespace."""
    status = Path(f"/proc/{global_pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[-1])


@pytest.fixture
def forger(accounts: Accounts) -> Iterator[tuple[str, int, Path]]:
    """A kernelspec whose launcher sends a forged callback (what user code that ran first could do), and a victim:
    a process of the gateway's account in its own process group, and a file of that account."""
    spec = accounts.base / "kernels" / "forger"
    spec.mkdir(mode=0o755, exist_ok=True)
    scripts = Path(__file__).resolve().parents[1] / "kernel-launchers" / "shared" / "scripts"
    (spec / "forger.py").write_text(FORGER.format(scripts=str(scripts)))
    (spec / "forger.py").chmod(0o644)
    marker = "sg-victim-" + os.urandom(4).hex()
    uid = accounts.uids[GATEWAY]
    victim_argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "setsid", "-f",
                   sys.executable, "-c", "import time; time.sleep(600)", marker]  # fmt: skip
    accounts.host.run(["/bin/sh", "-c", shlex.join(victim_argv) + " </dev/null >/dev/null 2>&1"])
    victim = next(pid for pid, cmd in accounts.host.processes() if marker in cmd)
    runtime = accounts.home(GATEWAY) / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    os.chown(runtime, uid, uid)
    yield "forger", victim, runtime
    with contextlib.suppress(ProcessLookupError):
        os.kill(victim, signal.SIGKILL)


async def test_forged_callback_values_never_act_as_the_gateway_account(accounts, as_gateway, forger):
    """The callback says pid/pgid = a process group of the gateway's account and a connection file of that
    account: shutdown and cleanup must neither kill that process nor remove that file."""
    name, victim, runtime = forger
    kernel_id = "forged-" + os.urandom(4).hex()
    target = runtime / f"sg-kernel-{kernel_id}.json"
    target.write_text("{}")
    os.chown(target, accounts.uids[GATEWAY], accounts.uids[GATEWAY])
    spec = {"argv": [sys.executable, str(accounts.base / "kernels" / name / "forger.py"), "{kernel_id}",
                     "{response_address}", "{public_key}"],
            "display_name": "forger", "language": "python",
            "env": {"SG_FORGED_PID": str(host_pid(victim)), "SG_FORGED_PGID": str(host_pid(victim)),
                    "SG_FORGED_FILE": str(target)},
            "metadata": {"kernel_provisioner": {"provisioner_name": "distributed-provisioner"}}}  # fmt: skip
    (accounts.base / "kernels" / name / "kernel.json").write_text(json.dumps(spec))
    (accounts.base / "kernels" / name / "kernel.json").chmod(0o644)
    km = as_gateway(name)
    await start(km, accounts, "alice", kernel_id=kernel_id)
    assert km.provisioner.pgid == host_pid(victim)  # accepted: it only ever acts on it as alice
    await km.shutdown_kernel(now=True)
    assert Path(f"/proc/{victim}").exists() and target.exists()
    assert await eventually(lambda: kernel_processes(accounts.host, kernel_id) == [], 10)  # the launch's group too


async def test_a_callback_naming_pid_1_fails_the_start(accounts, as_gateway, forger):
    name, _, runtime = forger
    kernel_id = "forged-" + os.urandom(4).hex()
    spec = json.loads((accounts.base / "kernels" / name / "kernel.json").read_text())
    spec["env"].update(SG_FORGED_PID="1", SG_FORGED_PGID="1", SG_FORGED_FILE=str(runtime / "x.json"))
    (accounts.base / "kernels" / "forger_pid1").mkdir(mode=0o755, exist_ok=True)
    (accounts.base / "kernels" / "forger_pid1" / "kernel.json").write_text(json.dumps(spec))
    (accounts.base / "kernels" / "forger_pid1" / "kernel.json").chmod(0o644)
    km = as_gateway("forger_pid1")
    with pytest.raises(Exception, match="reported pid 1: a kernel's pid is a number above 1") as info:
        await start(km, accounts, "alice", kernel_id=kernel_id)
    assert getattr(info.value, "status_code", None) == 500
    assert await eventually(lambda: kernel_processes(accounts.host, kernel_id) == [], 10)
