"""GP_ENABLE_TUNNELING against a host whose firewall lets nothing through but its SSH port."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from spark_gateway import tunnel
from tests.conftest import env, execute, kernel_processes, wait_for
from tests.test_lifecycle import REATTACH

# In: only SSH (and replies). Out: nothing the host starts itself, so not even the callback to the gateway.
RULES = """table inet sg_tunnel_test {
  chain input { type filter hook input priority 0; policy drop; iif lo accept; ct state established,related accept;
                tcp dport 22 accept; }
  chain output { type filter hook output priority 0; policy drop; oif lo accept; ct state established,related accept; }
}
"""


@pytest.fixture
def walled_host(lab) -> Iterator:
    if not shutil.which("nft") or lab.mode != "netns":
        pytest.skip("needs nftables and namespace hosts (make test installs nftables)")
    host = lab.hosts[1]
    subprocess.run(["ip", "netns", "exec", host.netns, "nft", "-f", "-"], input=RULES, text=True, check=True)
    try:
        yield host
    finally:
        subprocess.run(
            ["ip", "netns", "exec", host.netns, "nft", "delete", "table", "inet", "sg_tunnel_test"], check=False
        )


@pytest.mark.asyncio
async def test_without_tunneling_the_walled_host_cannot_call_back(walled_host, managers):
    km = managers(launch_timeout=30)
    with pytest.raises(Exception, match="cannot deliver connection info to"):
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=walled_host.name))
    assert wait_for(lambda: not kernel_processes(walled_host, km.kernel_id), 2)  # killed, not orphaned


@pytest.mark.asyncio
async def test_tunneled_kernel_works_through_ssh_alone(walled_host, managers, caplog):
    km = managers(enable_tunneling=True)
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=walled_host.name))
    info = km.get_connection_info()
    assert info["ip"] == "127.0.0.1" and km.provisioner.listener[0] == "127.0.0.1"
    out, _ = await execute(km, "import socket; print(socket.gethostname())")
    assert out.strip() == walled_host.hostname

    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=30)
        kc.execute("import time; time.sleep(60)")
        await asyncio.sleep(0.5)
        await km.interrupt_kernel()  # through the tunnelled control listener
        reply = await kc.get_shell_msg(timeout=10)
        assert reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        kc.stop_channels()
    assert await km.provisioner.control("poll") == {"ok": True, "alive": True}

    # a forward whose port nothing listens at (its kernel ended) is refused without an ERROR line per attempt
    forwards = tunnel.Tunnels(km.provisioner._tunnels.transport)  # noqa: SLF001
    port = forwards.forward(1)

    def refused() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            return conn.recv(1)  # b"": closed once the host refused

    with caplog.at_level(logging.DEBUG):
        assert [refused() for _ in range(3)] == [b""] * 3  # as ZMQ clients keep reconnecting
        with ThreadPoolExecutor(8) as pool:  # at once, as every tunnel of a kernel that just ended
            assert list(pool.map(lambda _: refused(), range(8))) == [b""] * 8
    forwards.close()
    said = [r.getMessage() for r in caplog.records if r.name.startswith(("paramiko", "spark_gateway"))]
    assert not [m for m in said if "open FAILED" in m or "cannot forward" in m], said
    await km.shutdown_kernel()
    assert wait_for(lambda: not kernel_processes(walled_host, km.kernel_id), 1.0)
    assert not [p for p, cmd in walled_host.processes() if "ssh" not in cmd and km.kernel_id in cmd]


@pytest.mark.asyncio
async def test_tunneled_kernel_is_reattached_by_a_new_gateway(walled_host, managers, kernels_dir, lab, tmp_path):
    km = managers(enable_tunneling=True)
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=walled_host.name))
    info = await km.provisioner.get_provisioner_info()
    (tmp_path / "info.json").write_text(json.dumps(info))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", REATTACH, str(tmp_path / "info.json"), str(kernels_dir), str(lab.ssh_config),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(GP_ENABLE_TUNNELING="true"),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result == {"alive": True, "interrupted": "KeyboardInterrupt", "alive_after": False}
    assert wait_for(lambda: not kernel_processes(walled_host, km.kernel_id), 1.0)


def test_a_refused_forward_is_explained_once_and_only_when_it_is_not_a_kernel_that_ended(caplog):
    """Pure logic of `Tunnels._refused`: what an operator reads when a forward fails."""
    import paramiko

    forwards = tunnel.Tunnels.__new__(tunnel.Tunnels)
    forwards._warned = set()  # noqa: SLF001
    with caplog.at_level(logging.WARNING, logger="spark_gateway.tunnel"):
        forwards._refused(7, paramiko.ChannelException(tunnel.CONNECT_FAILED, "Connect failed"))  # noqa: SLF001
        forwards._refused(7, paramiko.SSHException("Unable to open channel."))  # noqa: SLF001
        assert not caplog.records
        for _ in range(2):
            forwards._refused(8, paramiko.ChannelException(tunnel.PROHIBITED, "Administratively prohibited"))  # noqa: SLF001
        forwards._refused(9, paramiko.ChannelException(4, "Resource shortage"))  # noqa: SLF001
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "port 8" in said[0] and "AllowTcpForwarding" in said[0]
    assert "port 9" in said[1] and "Resource shortage" in said[1] and "AllowTcpForwarding" not in said[1]
