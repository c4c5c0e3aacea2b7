"""A real `jupyter server` with DistributedMappingKernelManager, killed with SIGKILL and started again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from collections.abc import Iterator

import pytest
import requests

from spark_gateway.specs import SpecOptions, install
from testlab.jupyter_rest import AUTH, run_code
from testlab.server_process import ServerProcess
from testlab.spark_cluster import SPARK_HOME
from tests.conftest import eventually, kernel_processes, wait_for

pytestmark = pytest.mark.asyncio


@pytest.fixture
def server(lab, kernels_dir, tmp_path) -> Iterator[ServerProcess]:
    srv = ServerProcess(lab, tmp_path, [kernels_dir / "ssh_python"], "--DistributedProvisioner.unreachable_grace=5")
    try:
        yield srv
    finally:
        if srv.proc is None and srv.store.exists() and any(srv.store.glob("*.json")):
            srv.start()  # adopt what the test left, so that it can be shut down
        if srv.proc is not None:
            for kernel_id in srv.kernels():
                srv.delete_kernel(kernel_id)
            srv.stop()


def host_of(lab, kernel_id: str):
    return next(h for h in lab.hosts if kernel_processes(h, kernel_id))


async def test_sigkilled_server_restarts_with_the_same_kernels_and_variables(lab, server):
    server.start()
    kept, lost = server.start_kernel(), server.start_kernel()
    assert (await run_code(server.base, kept, "x = 41; print('set')")).strip() == "set"
    kept_host, lost_host = host_of(lab, kept), host_of(lab, lost)

    # the store: a 0700 directory of 0600 records, one per kernel; their secrets never reach the log
    assert stat.S_IMODE(server.store.stat().st_mode) == 0o700
    files = {p.stem: p for p in server.store.glob("*.json")}
    assert set(files) == {kept, lost}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files.values())
    record = json.loads(files[kept].read_text())
    assert record["kernel_name"] == "ssh_python"
    assert record["provisioner_info"]["host"] in {h.name for h in lab.hosts}

    server.kill()
    assert kernel_processes(kept_host, kept)  # the kernels outlive their gateway
    for pid, _ in kernel_processes(lost_host, lost):  # ... and one of them dies while no gateway runs
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not kernel_processes(lost_host, lost), 5.0)

    server.start()
    assert await eventually(lambda: kept in server.kernels(), 30.0), server.log_text()[-3000:]
    assert (await run_code(server.base, kept, "print(x + 1)")).strip() == "42"  # same kernel, same variables
    assert await eventually(lambda: not (server.store / f"{lost}.json").exists(), 30.0)
    assert lost not in server.kernels()

    secrets = [record["provisioner_info"]["connection_info"]["key"], record["provisioner_info"]["listener"][2]]
    assert not any(s in server.log_text() for s in secrets)

    # a restored kernel restarts like any other (same host, new process), and its record follows
    r = requests.post(f"{server.base}/api/kernels/{kept}/restart", headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    assert (await run_code(server.base, kept, "print('again')")).strip() == "again"
    assert host_of(lab, kept) is kept_host
    after = json.loads((server.store / f"{kept}.json").read_text())["provisioner_info"]
    assert after["listener"][2] != record["provisioner_info"]["listener"][2]  # the new process's own secret

    assert server.delete_kernel(kept) == 204
    assert wait_for(lambda: not kernel_processes(kept_host, kept), 5.0)
    assert not (server.store / f"{kept}.json").exists()


async def test_tunnelled_kernels_on_hosts_down_at_restart(lab, kernels_dir, tmp_path):
    """Restored when the host answers within unreachable_grace; else cleaned up when it comes back."""
    if lab.mode != "netns":
        pytest.skip("cutting a host's network needs namespace hosts")
    server = ServerProcess(
        lab, tmp_path, [kernels_dir / "ssh_python"], "--DistributedProvisioner.enable_tunneling=True",
        "--DistributedProvisioner.unreachable_grace=20", "--DistributedProvisioner.host_quarantine=0.5",
    )  # fmt: skip
    server.start()
    back_soon, back_late = server.start_kernel(), server.start_kernel()
    soon_host, late_host = host_of(lab, back_soon), host_of(lab, back_late)
    assert soon_host is not late_host  # round-robin over a fresh gateway
    assert (await run_code(server.base, back_soon, "x = 'tunnelled'; print('set')")).strip() == "set"
    server.kill()
    soon_host.cut_network()
    late_host.cut_network()
    try:
        server.start()
        await asyncio.sleep(3.0)
        soon_host.restore_network()  # within the grace: adopted, through new tunnels
        assert await eventually(lambda: back_soon in server.kernels(), 40.0), server.log_text()[-3000:]
        assert (await run_code(server.base, back_soon, "print(x)")).strip() == "tunnelled"
        # the other host stays away longer than the grace: the kernel is forgotten ...
        assert await eventually(lambda: not (server.store / f"{back_late}.json").exists(), 60.0)
        assert back_late not in server.kernels()
        assert kernel_processes(late_host, back_late)  # ... but cannot be ended while its host is unreachable
        late_host.restore_network()
        assert await eventually(lambda: not kernel_processes(late_host, back_late), 30.0)  # ... until it returns
    finally:
        soon_host.restore_network()
        late_host.restore_network()
        if server.proc is not None:
            for kernel_id in server.kernels():
                server.delete_kernel(kernel_id)
            server.stop()
    assert not kernel_processes(soon_host, back_soon)


async def test_spark_kernel_survives_a_restart_then_is_culled_with_its_application(
    lab, kernels_dir, spark_cluster, tmp_path
):
    """Spark kernel on the standalone cluster: same SparkSession after SIGKILL + restart; culled when idle."""
    opts, _ = SpecOptions(spark=True, spark_master=spark_cluster.url, spark_init_mode="lazy", kernel_name="ops_spark",
                          spark_home=SPARK_HOME).resolve()  # fmt: skip
    spec = install(opts, kernels_dir / "ops_spark", replace=True)
    server = ServerProcess(lab, tmp_path, [spec], GP_LAUNCH_TIMEOUT="120")
    server.start()
    try:
        kernel_id = server.start_kernel("ops_spark")
        host = host_of(lab, kernel_id)
        code = "df = spark.range(100); print(sc.applicationId, df.count())"
        app_id, count = (await run_code(server.base, kernel_id, code)).strip().splitlines()[-1].split()
        assert count == "100" and spark_cluster.app(kernel_id)["state"] == "RUNNING"
        server.kill()

        server.args = ["--MappingKernelManager.cull_idle_timeout=8", "--MappingKernelManager.cull_interval=1"]
        server.start()
        assert await eventually(lambda: kernel_id in server.kernels(), 30.0), server.log_text()[-3000:]
        again = await run_code(server.base, kernel_id, "print(sc.applicationId, df.selectExpr('sum(id)').first()[0])")
        assert again.strip().split() == [app_id, "4950"]  # the same SparkSession and DataFrame

        # idle for cull_idle_timeout: jupyter_server culls it, and that ends it on its host with its application
        assert await eventually(lambda: kernel_id not in server.kernels(), 60.0), server.log_text()[-3000:]
        assert "Culling 'idle' kernel" in server.log_text()
        assert await eventually(lambda: not kernel_processes(host, kernel_id), 15.0)
        assert await eventually(lambda: spark_cluster.app(kernel_id)["state"] == "FINISHED", 30.0)
        assert await eventually(lambda: not spark_cluster.executors(app_id), 30.0)
        assert not (server.store / f"{kernel_id}.json").exists()
    finally:
        if server.proc is not None:
            for kid in server.kernels():
                server.delete_kernel(kid)
            server.stop()


async def test_a_normal_stop_leaves_kernels_for_the_next_start(lab, server):
    server.start()
    kernel_id = server.start_kernel()
    host = host_of(lab, kernel_id)
    assert (await run_code(server.base, kernel_id, "y = 'kept'; print('set')")).strip() == "set"
    server.stop()  # SIGTERM: jupyter_server's own shutdown, which would end every kernel
    assert kernel_processes(host, kernel_id)
    server.start()
    assert await eventually(lambda: kernel_id in server.kernels(), 30.0), server.log_text()[-3000:]
    assert (await run_code(server.base, kernel_id, "print(y)")).strip() == "kept"
