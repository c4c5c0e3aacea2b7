"""How kernels are reached: ssh_config features, reconnects, the embedded no-SSH path, seed-compatible specs."""

from __future__ import annotations

import asyncio
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from spark_gateway.ssh import SshPool, SshSettings
from tests.conftest import add_spec, env, execute, kernel_processes

pytestmark = pytest.mark.asyncio


async def test_proxy_jump_reaches_a_host_through_another(lab, managers, tmp_path):
    jump, target = lab.hosts[0], lab.hosts[2]
    cfg = tmp_path / "config"
    cfg.write_text(
        lab.ssh_config.read_text()
        + (
            f"\nHost behind-{target.name}\n  HostName {target.address}\n  Port {target.port}\n  User root\n"
            f"  IdentityFile {lab.identity}\n  UserKnownHostsFile {lab.known_hosts}\n  ProxyJump {jump.name}\n"
        )
    )
    alias = f"behind-{target.name}"
    km = managers(ssh_config_file=str(cfg), remote_hosts=[alias], response_ip=lab.gateway_address)
    await km.start_kernel(env=env())
    out, _ = await execute(km, "import socket; print(socket.gethostname())")
    assert out.strip() == target.hostname
    transport = km.provisioner.cluster.pool.client(alias).get_transport()
    assert not isinstance(transport.sock, socket.socket)  # a channel through the jump host, not a direct socket


async def test_proxy_jump_without_response_ip_says_what_to_set(lab, managers, tmp_path):
    jump, target = lab.hosts[0], lab.hosts[1]
    cfg = tmp_path / "config"
    cfg.write_text(
        lab.ssh_config.read_text()
        + (
            f"\nHost hidden\n  HostName {target.address}\n  User root\n  IdentityFile {lab.identity}\n"
            f"  UserKnownHostsFile {lab.known_hosts}\n  ProxyJump {jump.name}\n"
        )
    )
    km = managers(ssh_config_file=str(cfg), remote_hosts=["hidden"])
    with pytest.raises(Exception, match="set GP_RESPONSE_IP"):
        await km.start_kernel(env=env())


async def test_broken_pooled_connection_is_re_established(lab, managers):
    host = lab.hosts[1]
    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    host.stop_sshd()  # kills every SSH connection to the host too
    host.start_sshd()
    again = managers()
    await again.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    out, _ = await execute(again, "print('reconnected')")
    assert out.strip() == "reconnected"
    await km.shutdown_kernel()  # the first kernel is still managed over the new connection
    assert not kernel_processes(host, km.kernel_id)


async def test_many_quick_commands_at_once_keep_the_pooled_connection(lab):
    """Commands that end at once, from many threads over one pooled connection: all succeed, the connection stays.
    (paramiko's shutdown_write() could send its EOF after the channel's CLOSE, and OpenSSH then dropped the whole
    connection with everything on it: spark_gateway.ssh.send_eof.)"""
    pool, host, count = SshPool(SshSettings(config_file=str(lab.ssh_config))), lab.hosts[0].name, 1500
    try:
        transport = pool.client(host).get_transport()

        def burst() -> list[str]:
            with ThreadPoolExecutor(16) as executor:
                return [r.stdout.strip() for r in executor.map(lambda i: pool.run(host, f"echo {i}"), range(count))]

        assert await asyncio.to_thread(burst) == [str(i) for i in range(count)]
        assert pool.client(host).get_transport() is transport and transport.is_active()
    finally:
        pool.close()


async def test_localhost_is_launched_without_ssh(managers):
    km = managers(remote_hosts=["localhost"], ssh_config_file="/nonexistent/ssh_config")
    await km.start_kernel(env=env())
    out, _ = await execute(km, "import socket, os; print(socket.gethostname(), os.getppid() != 1)")
    assert out.split()[0] == socket.gethostname()
    assert km.provisioner.cluster.pool._clients == {}  # no SSH connection was made
    await km.shutdown_kernel()


async def test_a_hand_written_seed_spec_works(lab, managers, kernels_dir):
    """kernel.json exactly as the seed documents it: bare `python`, absolute script path, no env."""
    scripts = kernels_dir / "ssh_python" / "scripts"

    def seed(spec: dict) -> None:
        spec.clear()
        spec.update(
            {
                "argv": [
                    "python",
                    str(scripts / "launch_ipykernel.py"),
                    "--kernel-id",
                    "{kernel_id}",
                    "--port-range",
                    "{port_range}",
                    "--response-address",
                    "{response_address}",
                    "--public-key",
                    "{public_key}",
                    "--kernel-class-name",
                    "ipykernel.ipkernel.IPythonKernel",
                ],
                "env": {},
                "display_name": "Python SSH",
                "language": "python",
                "interrupt_mode": "signal",
                "metadata": {
                    "debugger": True,
                    "kernel_provisioner": {
                        "provisioner_name": "distributed-provisioner",
                        "config": {"launch_timeout": 30},
                    },
                },
            }
        )

    add_spec(kernels_dir, "seed_python", seed)
    km = managers("seed_python")
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[0].name))
    out, _ = await execute(km, "print(1 + 1)")
    assert out.strip() == "2"


async def test_kernelspec_config_overrides_the_gateway_config(lab, managers, kernels_dir):
    def edit(spec: dict) -> None:
        spec["metadata"]["kernel_provisioner"]["config"] = {"remote_hosts": [lab.hosts[2].name], "launch_timeout": 7}

    add_spec(kernels_dir, "only_host3", edit)
    km = managers("only_host3")
    await km.start_kernel(env=env())
    assert km.provisioner.host == lab.hosts[2].name
    assert km.provisioner.launch_timeout == 7


async def test_prohibited_response_address_is_refused_with_the_fix(lab, managers):
    km = managers(prohibited_local_ips=[lab.gateway_address])
    with pytest.raises(Exception, match="GP_PROHIBITED_LOCAL_IPS.*set GP_RESPONSE_IP"):
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[0].name))


async def test_provisioner_info_is_json_and_names_the_host(lab, managers):
    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[1].name))
    info = json.loads(json.dumps(await km.provisioner.get_provisioner_info()))
    assert info["host"] == lab.hosts[1].name and info["hostname"] == lab.hosts[1].hostname
    assert info["connection_info"]["ip"] == lab.hosts[1].address
