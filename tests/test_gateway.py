"""The process-wide Gateway and the request judged whole, against real lab hosts (defects the architecture fixed)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpec

from spark_gateway.errors import ProvisionerError
from spark_gateway.gateway import Gateway
from spark_gateway.provisioner import DistributedProvisioner
from spark_gateway.ssh import SshSettings
from tests.conftest import add_spec, env, eventually

pytestmark = pytest.mark.asyncio

UNUSED_LAB_ADDRESS = "10.250.0.250"  # in the lab's subnet, where no host answers: connecting would hang


async def test_malformed_request_with_every_host_down_gets_its_own_400_and_touches_no_host(lab, managers, kernels_dir):
    spark = add_spec(kernels_dir, "gw_spark_opts", lambda s: s["env"].update(SPARK_OPTS="--master local[1]"))
    hosts = [UNUSED_LAB_ADDRESS, f"{UNUSED_LAB_ADDRESS}:2222"]
    km = managers(spark, remote_hosts=hosts, load_balancing_algorithm="least-connection", ssh_connect_timeout=30)
    with pytest.raises(ProvisionerError) as refused:
        await km.start_kernel(env=env(KERNEL_EXTRA_SPARK_OPTS="--master yarn"))
    assert refused.value.status_code == 400 and "--master" in refused.value.message
    cluster = Gateway.instance().cluster(km.provisioner.ssh_settings())
    assert not cluster.health.hosts and not cluster.pool._clients  # no host was tried, quarantined or connected
    with pytest.raises(ProvisionerError) as forbidden:  # a pin elsewhere is 403, also before any host
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST="somewhere.else"))
    assert forbidden.value.status_code == 403 and not cluster.health.hosts


async def test_owed_cleanups_of_every_ssh_settings_pool_are_run(lab, tmp_path: Path):
    gateway = Gateway.instance()
    first = gateway.cluster(SshSettings(config_file=str(lab.ssh_config), connect_timeout=4))
    second = gateway.cluster(SshSettings(config_file=str(lab.ssh_config), connect_timeout=6))
    assert first is not second
    markers = [tmp_path / "first-ran", tmp_path / "second-ran"]  # the lab hosts share this filesystem
    for cluster, host, marker in zip((first, second), lab.hosts[:2], markers, strict=True):
        cluster.failed(host.name, "test: unreachable a moment ago", base=0.1)
        cluster.health.owe(host.name, f"touch {marker}")
        await gateway.ensure_reaper(cluster, base=0.1, probe_timeout=5)
    assert await eventually(lambda: all(m.exists() for m in markers), timeout=20)
    assert not first.health.owed and not second.health.owed


async def test_kernelspecs_keep_their_own_quarantine_on_a_shared_pool(lab):
    spec = KernelSpec(argv=["true"], display_name="t", env={})
    short, long = (DistributedProvisioner(kernel_id=f"q{q}", kernel_spec=spec, host_quarantine=q) for q in (0.5, 100.0))
    short.ssh_config_file = long.ssh_config_file = str(lab.ssh_config)
    assert short.cluster is long.cluster  # same SSH settings: one pool, one view of host health
    host_a, host_b = lab.hosts[0].name, lab.hosts[1].name
    long._host_failed(host_a, "test failure")
    short._host_failed(host_b, "test failure")
    long._host_failed(host_b + "x", "test failure")  # after the short one: it must not change the short's base
    health = short.cluster.health
    now = time.monotonic()
    assert 90 < health.hosts[host_a].until - now <= 100
    assert 0 < health.hosts[host_b].until - now <= 0.5
    for name in (host_a, host_b, host_b + "x"):
        health.recovered(name)


async def test_gateway_reset_starts_afresh(lab):
    before = Gateway.instance()
    key = await before.private_key()
    cluster = before.cluster(SshSettings(config_file=str(lab.ssh_config)))
    host = await cluster.host(lab.hosts[0].name)
    assert not host.local and (await host.arun("hostname")).stdout.strip() == lab.hosts[0].name
    Gateway.reset()
    after = Gateway.instance()
    assert after is not before and await after.private_key() is not key
    assert not cluster.pool._clients  # the old connections were closed
    Gateway.reset()  # leave the conftest a gateway whose key matches nothing stale
    await asyncio.sleep(0)
