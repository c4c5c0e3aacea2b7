"""Kernels on real SSH hosts through jupyter_client's AsyncKernelManager: the whole lifecycle."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import env, execute, kernel_processes, wait_for

pytestmark = pytest.mark.asyncio

HOSTILE = {
    "KERNEL_QUOTES": "it's \"quoted\" and 'single'",
    "KERNEL_SUBST": "$(touch /tmp/sg-pwned-1) `touch /tmp/sg-pwned-2` ${HOME} $HOME",
    "KERNEL_NEWLINE": "line one\nline two; touch /tmp/sg-pwned-3\n",
    "KERNEL_UNICODE": "Grüße, 数据, ☃",
    "KERNEL_SEMI": "x'; touch /tmp/sg-pwned-4; echo '",
}
HOSTILE_USER = "bob'; touch /tmp/sg-pwned-5 #"  # not a plain POSIX user name: refused (400) before any host is used


async def test_kernel_on_each_host_runs_there(lab, managers):
    for host in lab.hosts:
        km = managers()
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
        out, reply = await execute(km, "import socket, os; print(socket.gethostname(), os.getpid())")
        name, pid = out.split()
        assert reply["status"] == "ok"
        assert name == host.hostname
        assert int(pid) == km.provisioner.pid  # as the host's own process table numbers it
        assert kernel_processes(host, km.kernel_id)
        others = [h for h in lab.hosts if h is not host]
        assert not any(kernel_processes(h, km.kernel_id) for h in others)
        await km.shutdown_kernel()


async def test_round_robin_spreads_and_pins_do_not_advance(lab, managers):
    hosts = []
    for _ in range(3):
        km = managers()
        await km.start_kernel(env=env())
        hosts.append(km.provisioner.host)
    assert sorted(hosts) == sorted(h.name for h in lab.hosts)
    pinned = managers()
    await pinned.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[0].name))
    following = managers()
    await following.start_kernel(env=env())
    assert following.provisioner.host == hosts[0]  # the pin did not move the round-robin index


async def test_least_connection_fills_the_emptiest_host(lab, managers):
    busy = managers(load_balancing_algorithm="least-connection")
    await busy.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[0].name))
    placed = []
    for _ in range(2):
        km = managers(load_balancing_algorithm="least-connection")
        await km.start_kernel(env=env())
        placed.append(km.provisioner.host)
    assert sorted(placed) == sorted(h.name for h in lab.hosts[1:])
    await busy.shutdown_kernel()
    km = managers(load_balancing_algorithm="least-connection")
    await km.start_kernel(env=env())
    assert km.provisioner.host == lab.hosts[0].name  # released by the shutdown


async def test_pin_outside_configured_hosts_is_refused(lab, managers):
    km = managers()
    with pytest.raises(Exception, match="not one of the configured remote hosts") as info:
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST="attacker.example.com"))
    assert info.value.status_code == 403
    assert not km.has_kernel


async def test_hostile_kernel_values_arrive_intact_and_execute_nothing(lab, managers):
    host = lab.hosts[1]
    km = managers(unauthorized_users=[])
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name, **HOSTILE))
    code = f"import os, json; print(json.dumps({{k: os.environ.get(k) for k in {sorted(HOSTILE)!r}}}))"
    out, _ = await execute(km, code)
    assert json.loads(out) == HOSTILE
    refused = managers(unauthorized_users=[])
    with pytest.raises(Exception, match="is not a plain POSIX user name") as info:
        await refused.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name, KERNEL_USERNAME=HOSTILE_USER))
    assert getattr(info.value, "status_code", None) == 400
    listing = host.run(["sh", "-c", "ls /tmp | grep sg-pwned || true"]).stdout
    assert listing.strip() == ""
    assert not list(Path("/tmp").glob("sg-pwned-*"))


async def test_interrupt_busy_cell_then_kernel_still_usable(lab, managers):
    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[2].name))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        msg_id = kc.execute("import time; time.sleep(60)")
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - started < 10
    finally:
        kc.stop_channels()
    out, _ = await execute(km, "print(6 * 7)")
    assert out.strip() == "42"


async def test_restart_keeps_the_host_and_gives_a_new_process(lab, managers):
    host = lab.hosts[1]
    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    old = {pid for pid, _ in kernel_processes(host, km.kernel_id)}
    await execute(km, "x = 1")
    await km.restart_kernel()
    assert km.provisioner.host == host.name
    out, _ = await execute(km, "print('x' in globals())")
    assert out.strip() == "False"
    new = {pid for pid, _ in kernel_processes(host, km.kernel_id)}
    assert new and not new & old  # a new process, and the old one is gone


async def test_shutdown_leaves_nothing_on_the_host(lab, managers):
    host = lab.hosts[0]
    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    await execute(km, "import subprocess; child = subprocess.Popen(['sleep', '300'])")
    info = await km.provisioner.get_provisioner_info()
    assert kernel_processes(host, km.kernel_id)
    assert host.run(["test", "-e", info["connection_file"]], check=False).returncode == 0
    await km.shutdown_kernel()
    gone_by = time.monotonic() + 1.0
    assert wait_for(lambda: not kernel_processes(host, km.kernel_id), 1.0)
    assert time.monotonic() <= gone_by + 0.1
    assert not any(cmd.startswith("sleep 300") for _, cmd in host.processes())  # the kernel's child too
    assert host.run(["test", "-e", info["connection_file"]], check=False).returncode != 0


REATTACH = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.provisioning import KernelProvisionerFactory
    from traitlets.config import Config

    async def main():
        info = json.load(open(sys.argv[1]))
        cfg = Config()
        cfg.DistributedProvisioner.ssh_config_file = sys.argv[3]
        km = AsyncKernelManager(kernel_name="ssh_python", config=cfg,
                                kernel_spec_manager=KernelSpecManager(kernel_dirs=[sys.argv[2]]))
        km.kernel_id = info["kernel_id"]
        km.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            km.kernel_id, km.kernel_spec, parent=km)
        await km.provisioner.load_provisioner_info(info)
        km.load_connection_info(km.provisioner.connection_info)  # tunnelled kernels get new local ports
        result = {"alive": await km.is_alive()}
        kc = km.client(); kc.start_channels(); await kc.wait_for_ready(timeout=30)
        msg_id = kc.execute("import time; time.sleep(60)")
        await asyncio.sleep(0.5)
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=10)
        result["interrupted"] = reply["content"].get("ename")
        kc.stop_channels()
        await km.shutdown_kernel()
        result["alive_after"] = await km.is_alive()
        print(json.dumps(result))

    asyncio.run(main())
    """
)


async def test_fresh_manager_in_new_process_reattaches(lab, managers, kernels_dir, tmp_path):
    host = lab.hosts[2]
    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    info = await km.provisioner.get_provisioner_info()
    (tmp_path / "info.json").write_text(json.dumps(info))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        REATTACH,
        str(tmp_path / "info.json"),
        str(kernels_dir),
        str(lab.ssh_config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result == {"alive": True, "interrupted": "KeyboardInterrupt", "alive_after": False}
    assert wait_for(lambda: not kernel_processes(host, km.kernel_id), 1.0)
    assert await km.is_alive() is False


async def test_unauthenticated_control_request_is_ignored(lab, managers):
    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[0].name))
    ip, port, _ = km.provisioner.listener
    for forged in (
        {"op": "shutdown", "args": {}, "mac": "00" * 32},
        {"op": "signal", "args": {"signum": signal.SIGKILL, "group": True}},
        "not json at all",
    ):
        reader, writer = await asyncio.open_connection(ip, port)
        await reader.readline()  # the challenge
        line = forged if isinstance(forged, str) else json.dumps(forged)
        writer.write(line.encode() + b"\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without an answer
        writer.close()
    await asyncio.sleep(0.3)
    assert await km.is_alive()
    out, _ = await execute(km, "print('still here')")
    assert out.strip() == "still here"


async def test_kill_and_poll_fall_back_to_ssh_when_listener_is_gone(lab, managers):
    host = lab.hosts[1]
    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    km.provisioner.listener = (km.provisioner.listener[0], 1, "00")  # a port nothing listens on
    assert await km.provisioner.poll() is None  # alive, learnt over SSH
    await km.provisioner.kill()
    assert wait_for(lambda: not kernel_processes(host, km.kernel_id), 2)
    assert await km.provisioner.poll() is not None


async def test_jupyter_execute_runs_a_notebook_on_a_remote_host(lab, kernels_dir, tmp_path):
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "metadata": {},
                "execution_count": None,
                "outputs": [],
                "source": "import socket\nprint('ran on', socket.gethostname())",
            },
        ],
        "metadata": {"kernelspec": {"name": "ssh_python", "display_name": "Python SSH", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = tmp_path / "where.ipynb"
    path.write_text(json.dumps(nb))
    (tmp_path / "jp" / "kernels").mkdir(parents=True)
    (tmp_path / "jp" / "kernels" / "ssh_python").symlink_to(kernels_dir / "ssh_python")
    target = lab.hosts[1]
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "jupyter"),
        "execute",
        "--inplace",
        str(path),
        env=env(
            JUPYTER_PATH=str(tmp_path / "jp"),
            GP_REMOTE_HOSTS=",".join(h.name for h in lab.hosts),
            GP_SSH_CONFIG_FILE=str(lab.ssh_config),
            KERNEL_REMOTE_HOST=target.name,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    outputs = json.loads(path.read_text())["cells"][0]["outputs"]
    assert "".join(outputs[0]["text"]).strip() == f"ran on {target.hostname}"


async def test_polls_ride_one_kept_connection_that_reports_the_kernel_s_death_at_once(lab, managers):
    """Polls reuse one authenticated connection (a reply carries the next challenge), which proves the kernel
    alive between real requests; the kernel's death closes it, so the next poll asks again and reports it."""
    host = lab.hosts[2]
    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    assert await km.is_alive()
    channel = km.provisioner._control
    kept = channel._connection
    assert kept is not None and channel.vouches(60.0)
    for _ in range(5):
        assert await km.is_alive()
    assert km.provisioner._control is channel and channel._connection is kept  # no new connection
    pid = km.provisioner.pid
    host.run(["kill", "-9", str(pid)])
    assert wait_for(lambda: not any(p == pid for p, _ in kernel_processes(host, km.kernel_id)), 5)
    for _ in range(20):  # the FIN is in: let the event loop read it
        if not channel.vouches(60.0):
            break
        await asyncio.sleep(0.1)
    assert not channel.vouches(60.0)  # well inside the lease, which alone would have vouched for 30 s
    assert await km.provisioner.poll() is not None
    await km.shutdown_kernel(now=True)


async def test_a_started_kernel_is_handed_over_with_its_ports_bound(lab, managers):
    """The callback precedes the kernel's binding (no user file runs before it); the start waits for the binding
    (control op `ready`), so a client's first connection attempt is never refused."""
    import socket

    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[0].name))
    info = km.get_connection_info()
    for name in ("shell_port", "iopub_port", "stdin_port", "control_port"):
        socket.create_connection((info["ip"], info[name]), timeout=5).close()  # refused: raises
    await km.shutdown_kernel(now=True)
