"""Placement under faults, against real hosts: kernels land on live hosts, counts stay right, nothing is orphaned."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time

import pytest

from spark_gateway.placement import KERNEL_INVENTORY, HostReport
from tests.conftest import env, eventually, execute, kernel_processes, wait_for

pytestmark = pytest.mark.asyncio


def kernels_on(host) -> set[str]:
    """Kernel ids running on `host`, as the host itself reports them."""
    return set(HostReport.parse(host.run(["sh", "-c", KERNEL_INVENTORY]).stdout).kernel_ids)


def assert_no_orphans(lab, running: dict[str, str]) -> None:
    """Every kernel process on every host is one the gateway believes runs there (kernel id -> host name)."""
    for host in lab.hosts:
        assert kernels_on(host) == {k for k, h in running.items() if h == host.name}, host.name


async def shutdown_all(kms) -> None:
    await asyncio.gather(*(km.shutdown_kernel(now=True) for km in kms if km.has_kernel))


async def test_down_host_is_skipped_then_takes_kernels_again(lab, managers):
    down = lab.hosts[1]
    down.stop_sshd()
    try:
        kms = [managers(ssh_connect_timeout=2) for _ in range(3)]
        for km in kms:
            await km.start_kernel(env=env())
        placed = [km.provisioner.host for km in kms]
        assert down.name not in placed and len(set(placed)) == 2
        info = await kms[0].provisioner.get_provisioner_info()
        skipped = " ".join(s for km in kms for s in km.provisioner.skipped)
        assert down.name in skipped and "Connection refused" in skipped
        assert info["host"] in {h.name for h in lab.hosts if h is not down}
    finally:
        down.start_sshd()
    await asyncio.sleep(0.3)  # the quarantine (0.2 s in tests) ends; the host is probed before it is used
    later = [managers() for _ in range(3)]
    for km in later:
        await km.start_kernel(env=env())
    assert down.name in {km.provisioner.host for km in later}
    assert_no_orphans(lab, {km.kernel_id: km.provisioner.host for km in kms + later})
    await shutdown_all(kms + later)


async def test_every_host_down_lists_each_failure(lab, managers):
    for host in lab.hosts:
        host.stop_sshd()
    try:
        km = managers(ssh_connect_timeout=2)
        with pytest.raises(Exception) as info:
            await km.start_kernel(env=env())
        message = str(info.value)
        assert info.value.status_code == 503
        assert all(f"{h.name}:" in message for h in lab.hosts) and message.count("Connection refused") >= 3
    finally:
        for host in lab.hosts:
            host.start_sshd()
    await asyncio.sleep(0.3)


async def test_pinned_launch_does_not_fail_over(lab, managers):
    down = lab.hosts[2]
    down.stop_sshd()
    try:
        km = managers(ssh_connect_timeout=2)
        with pytest.raises(Exception, match=f"cannot reach {down.name}") as info:
            await km.start_kernel(env=env(KERNEL_REMOTE_HOST=down.name))
        assert info.value.status_code == 503
        assert not any(kernel_processes(h, km.kernel_id) for h in lab.hosts)
    finally:
        down.start_sshd()
    await asyncio.sleep(0.3)


async def test_sshd_killed_during_a_burst_of_launches(lab, managers):
    victim = lab.hosts[0]
    kms = [managers(load_balancing_algorithm="least-connection", ssh_connect_timeout=2) for _ in range(9)]
    starts = [asyncio.ensure_future(km.start_kernel(env=env())) for km in kms]
    await asyncio.sleep(0.05)
    victim.stop_sshd()
    try:
        results = await asyncio.gather(*starts, return_exceptions=True)
        running = {
            km.kernel_id: km.provisioner.host
            for km, r in zip(kms, results, strict=True)
            if not isinstance(r, BaseException)
        }
        failed = [r for r in results if isinstance(r, BaseException)]
        assert all("cannot" in str(r) or "host" in str(r) for r in failed), [repr(r) for r in failed]
        assert len(running) >= 6  # the live hosts took the rest
        for km in kms:
            if km.kernel_id in running and km.provisioner.host != victim.name:
                assert await km.is_alive()
        # no orphan: what runs on the live hosts is exactly what the gateway thinks
        for host in lab.hosts[1:]:
            assert kernels_on(host) == {k for k, h in running.items() if h == host.name}
    finally:
        victim.start_sshd()
    await asyncio.sleep(0.3)
    await shutdown_all(kms)
    assert await eventually(lambda: not kernels_on(victim), 10)  # its kernels were shut down once it came back


async def test_network_cut_while_kernel_runs(lab, managers):
    host = lab.hosts[2]
    km = managers(ssh_connect_timeout=2, unreachable_grace=3)
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    host.cut_network()
    try:
        started = time.monotonic()
        assert await km.provisioner.poll() is None  # no answer is not yet a death: the grace period runs
        while await km.provisioner.poll() is None:  # then it is reported lost
            assert time.monotonic() - started < 30
        assert time.monotonic() - started >= 3
        started = time.monotonic()
        await km.shutdown_kernel()  # does not hang on the unreachable host
        assert time.monotonic() - started < 30
        assert km.kernel_id not in kernels_on(lab.hosts[0]) | kernels_on(lab.hosts[1])
    finally:
        host.restore_network()
    # the cleanup owed to the host runs once it answers again: no orphan is left there
    assert await eventually(lambda: km.kernel_id not in kernels_on(host), 30)


async def test_kernel_killed_from_outside_is_reported_and_uncounted(lab, managers):
    host = lab.hosts[1]
    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    assert km.kernel_id in kernels_on(host)
    host.run(["sh", "-c", f"kill -9 {km.provisioner.pid}"])
    assert wait_for(lambda: km.kernel_id not in kernels_on(host), 5)
    assert await km.provisioner.poll() is not None
    assert not await km.is_alive()


async def test_least_load_avoids_a_busy_host(lab, managers, tmp_path):
    """The lab's hosts share one machine, so each is given its own load figure to make them uneven."""
    busy = lab.hosts[0]
    for host, load in zip(lab.hosts, ("64.00", "0.10", "0.10"), strict=True):
        fake = tmp_path / f"loadavg-{host.name}"
        fake.write_text(f"{load} {load} {load} 1/99 4242\n")
        host.run(["mount", "--bind", str(fake), "/proc/loadavg"])  # what this host's /proc/loadavg now says
    try:
        kms = [managers(load_balancing_algorithm="least-load") for _ in range(4)]
        for km in kms:
            await km.start_kernel(env=env())
        placed = [km.provisioner.host for km in kms]
        assert busy.name not in placed and set(placed) == {h.name for h in lab.hosts[1:]}
    finally:
        for host in lab.hosts:
            host.run(["umount", "/proc/loadavg"])
    await shutdown_all(kms)


GATEWAY = textwrap.dedent(
    """
    import asyncio, json, sys
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from traitlets.config import Config

    async def main(kernels_dir, ssh_config, hosts, count):
        cfg = Config()
        cfg.DistributedProvisioner.ssh_config_file = ssh_config
        cfg.DistributedProvisioner.remote_hosts = hosts.split(",")
        cfg.DistributedProvisioner.response_port = 0
        cfg.DistributedProvisioner.load_balancing_algorithm = "least-connection"
        kms = [AsyncKernelManager(kernel_name="ssh_python", config=cfg,
                                  kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels_dir]))
               for _ in range(int(count))]
        sys.stdin.readline()  # the test says when to start
        await asyncio.gather(*(km.start_kernel(env={"KERNEL_USERNAME": "alice"}) for km in kms))
        infos = [await km.provisioner.get_provisioner_info() for km in kms]
        print(json.dumps(infos), flush=True)
        sys.stdin.readline()  # then exit abruptly, leaving the kernels running (a crashed gateway)

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def test_two_gateways_balance_together_and_a_new_gateway_reattaches(lab, managers, kernels_dir):
    hosts = ",".join(h.name for h in lab.hosts)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            GATEWAY,
            str(kernels_dir),
            str(lab.ssh_config),
            hosts,
            "3",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    infos = []
    for proc in procs:  # one after the other: the second learns the first's kernels from the hosts alone
        # (two gateways placing at the same instant cannot see each other's launches in flight: README, Placement)
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        infos += json.loads(await asyncio.wait_for(proc.stdout.readline(), 120))
    for proc in procs:
        proc.kill()
        await proc.wait()
    per_host = {h.name: len(kernels_on(h)) for h in lab.hosts}
    assert per_host == {h.name: 2 for h in lab.hosts}  # six kernels from two gateways: two on each host
    # a new gateway (this process) takes them over from their provisioner info
    kms = []
    for info in infos:
        km = managers()
        km.kernel_id = info["kernel_id"]
        from jupyter_client.provisioning import KernelProvisionerFactory

        km.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            km.kernel_id, km.kernel_spec, parent=km
        )
        await km.provisioner.load_provisioner_info(info)
        km.load_connection_info(info["connection_info"])
        kms.append(km)
    assert all([await km.is_alive() for km in kms])
    out, _ = await execute(kms[0], "print('adopted')")
    assert out.strip() == "adopted"
    # the next least-connection kernel goes where the hosts say there is room, counts learnt from the hosts
    await kms[0].shutdown_kernel()
    extra = managers(load_balancing_algorithm="least-connection")
    await extra.start_kernel(env=env())
    assert extra.provisioner.host == infos[0]["host"]
    await shutdown_all(kms[1:] + [extra])
    assert all(not kernels_on(h) for h in lab.hosts)
