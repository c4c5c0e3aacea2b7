"""R kernels (IRkernel, started by kernel-launchers/R/scripts/launch_IRkernel.R) on real SSH hosts, through the
provisioner, from specs built by the real spec tooling."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest

from spark_gateway import specs
from spark_gateway.control import control_request
from tests.conftest import env, execute, kernel_processes, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel-launchers" / "shared" / "scripts"))
import sg_reports  # noqa: E402

pytestmark = pytest.mark.skipif(
    not shutil.which("Rscript"),
    reason="Rscript is not installed: `make system-deps` installs r-base-core and r-cran-irkernel",
)
R_HOSTNAME = 'cat(Sys.info()[["nodename"]], Sys.getpid())'


def install_r_spec(kernels_dir: Path, name: str, spark: bool = False, **options: object) -> str:
    opts, _ = specs.SpecOptions(language="R", spark=spark, kernel_name=name, **options).resolve()
    specs.install(opts, kernels_dir / name, replace=True)
    return name


def edit_env(kernels_dir: Path, name: str, **values: str) -> None:
    path = kernels_dir / name / "kernel.json"
    spec = json.loads(path.read_text())
    spec["env"].update(values)
    path.write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def ssh_r(kernels_dir: Path) -> str:
    return install_r_spec(kernels_dir, "ssh_r")


@pytest.mark.asyncio
async def test_r_kernel_runs_on_its_host_and_restarts_there(lab, managers, ssh_r):
    host = lab.hosts[1]
    km = managers(ssh_r)
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    out, reply = await execute(km, f"x <- 1; {R_HOSTNAME}")
    assert reply["status"] == "ok", out
    name, pid = out.split()
    assert name == host.hostname
    assert int(pid) == km.provisioner.pid  # the pid the gateway signals is the R kernel's own
    old = {pid for pid, _ in kernel_processes(host, km.kernel_id)}
    assert len(old) == 2  # R and its listener
    assert not any(kernel_processes(h, km.kernel_id) for h in lab.hosts if h is not host)

    await km.restart_kernel()
    assert km.provisioner.host == host.name
    out, _ = await execute(km, f'cat(exists("x"), ""); {R_HOSTNAME}')
    assert out.split()[:2] == ["FALSE", host.hostname]
    new = {pid for pid, _ in kernel_processes(host, km.kernel_id)}
    assert new and not new & old  # new processes, and the old ones are gone


@pytest.mark.asyncio
async def test_interrupt_busy_r_cell_then_kernel_still_usable(lab, managers, ssh_r):
    km = managers(ssh_r)
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[2].name))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        msg_id = kc.execute('cat("sleeping\\n"); Sys.sleep(60)')
        while True:  # the cell runs once its output arrives
            msg = await kc.get_iopub_msg(timeout=10)
            if msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
                break
        await km.interrupt_kernel()
        reply = await kc.get_shell_msg(timeout=10)  # far less than the 60 s the cell would take
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "abort"  # IRkernel's reply to an interrupted cell
    finally:
        kc.stop_channels()
    out, reply = await execute(km, "cat(6 * 7)")
    assert (out, reply["status"]) == ("42", "ok")


@pytest.mark.parametrize("how", ["shutdown_request", "shutdown op"])
@pytest.mark.asyncio
async def test_shutdown_leaves_nothing_on_the_host(lab, managers, ssh_r, how):
    host = lab.hosts[0]
    km = managers(ssh_r)
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    await execute(km, 'system("sleep 301", wait = FALSE)')
    info = await km.provisioner.get_provisioner_info()
    assert Path(info["connection_file"]).name == f"sg-kernel-{km.kernel_id}.json"
    assert host.run(["test", "-e", info["connection_file"]], check=False).returncode == 0
    assert any(cmd.startswith("sleep 301") for _, cmd in host.processes())
    if how == "shutdown_request":  # IRkernel quits; the listener follows
        await km.shutdown_kernel()
    else:  # the control listener's op: SIGTERM to the kernel's process group, SIGKILL after 1 s
        ip, port, secret = km.provisioner.listener
        assert await control_request(ip, port, secret, "shutdown") == {"ok": True}
    assert wait_for(lambda: not kernel_processes(host, km.kernel_id), 1.0)
    assert not any(cmd.startswith("sleep 301") for _, cmd in host.processes())  # the kernel's child too
    assert host.run(["test", "-e", info["connection_file"]], check=False).returncode != 0


@pytest.mark.asyncio
async def test_missing_irkernel_fails_the_start_with_the_reason(lab, managers, kernels_dir, tmp_path):
    name = install_r_spec(kernels_dir, "ssh_r_no_irkernel")
    # R then searches its base library only (R_LIBS_SITE names the site libraries, where IRkernel is)
    edit_env(kernels_dir, name, R_LIBS_SITE=str(tmp_path / "empty"), R_LIBS_USER=str(tmp_path / "empty"))
    host = lab.hosts[1]
    km = managers(name)
    with pytest.raises(Exception, match="IRkernel cannot be loaded") as info:
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    message = str(info.value)
    assert "before reporting its connection info (exit status 1)" in message, message  # not the launch timeout
    assert "apt-get install r-cran-irkernel" in message
    # the listener, started before the check (it takes the token first), ends once it sees R gone
    assert wait_for(lambda: not kernel_processes(host, km.kernel_id), 10.0)


def pyspark_home() -> str:
    """pip's pyspark: a Spark distribution (bin/spark-submit) without R/lib/SparkR."""
    found = importlib.util.find_spec("pyspark")
    return str(Path(found.origin).parent) if found and found.origin else ""


@pytest.mark.skipif(not pyspark_home(), reason="needs pyspark (pip install -e '.[spark]')")
@pytest.mark.parametrize("mode", ["lazy", "eager"])
@pytest.mark.asyncio
async def test_r_spark_kernel_without_sparkr_fails_the_start_with_the_reason(lab, managers, kernels_dir, mode):
    spark_home = pyspark_home()
    assert not Path(spark_home, "R", "lib", "SparkR").exists()
    name = install_r_spec(kernels_dir, f"ssh_r_spark_{mode}", spark=True, spark_master="local[*]",
                          spark_home=spark_home, spark_init_mode=mode)  # fmt: skip
    km = managers(name)
    with pytest.raises(Exception, match=f"SparkR is not installed under {spark_home}/R/lib") as info:
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[2].name))
    message = str(info.value)
    assert "before reporting its connection info (exit status 1)" in message, message
    assert "install a Spark distribution with R support" in message and "docs/r-kernels.md" in message


@pytest.mark.asyncio
async def test_r_launcher_refuses_to_start_without_a_launch_token(tmp_path):
    """Run directly (no gateway): a launcher started by hand says what is missing instead of hanging."""
    script = Path(specs.data_dir("kernel-launchers")) / "R" / "scripts" / "launch_IRkernel.R"
    args = ["--kernel-id", "k1", "--response-address", "127.0.0.1:1", "--public-key", "AAAA"]
    proc = await asyncio.create_subprocess_exec(
        shutil.which("Rscript"),
        str(script),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "error: no launch token on stdin" in err.decode(), err.decode()


def test_listener_serves_the_spark_report_the_r_launcher_keeps(tmp_path):
    """R Spark kernels report their SparkSession through a file (`--info-file`): `info` waits for it to change."""
    path = tmp_path / "sg-kernel-k1-info.json"
    report = sg_reports.FileReport(str(path))
    assert report(0) == {}
    path.write_text(json.dumps({"spark": {"state": "starting"}}))
    assert report(0) == {"spark": {"state": "starting"}}

    def replace() -> None:  # as launch_IRkernel.R writes it: a new file renamed over the old one
        (tmp_path / "new").write_text(json.dumps({"spark": {"state": "ready", "app_id": "app-1"}}))
        os.rename(tmp_path / "new", path)

    threading.Timer(0.3, replace).start()
    assert report(4.0) == {"spark": {"state": "ready", "app_id": "app-1"}}  # not the report it started with
