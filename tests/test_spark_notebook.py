"""What a Python Spark kernel shows in the notebook, through real kernels on lab hosts and the standalone cluster:
the real SparkSession objects (eager) or proxies that pass isinstance (lazy), `%spark`, and each cell's live job
progress display (display_data, then update_display_data with the same display_id, ending in its final state)."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from jupyter_client import AsyncKernelManager

from spark_gateway.specs import SpecOptions, install
from testlab.hostlab import LabHost
from testlab.spark_cluster import SPARK_HOME, SparkCluster
from tests.conftest import env

EIGHT_TASKS = "print(sc.parallelize(range(8), 8).map(lambda x: (__import__('time').sleep(0.4), x)[1]).sum())"


@pytest.fixture(scope="module")
def notebook_specs(kernels_dir: Path, spark_cluster: SparkCluster) -> Path:
    """`nb_eager`, and `nb_lazy` with the progress display turned off in its env (the kernelspec's switch). Eager
    kernels report ready once their session exists: 240 s, for a CI machine as loaded as ours gets."""
    for mode in ("lazy", "eager"):
        opts, _ = SpecOptions(spark=True, spark_master=spark_cluster.url, spark_init_mode=mode, spark_home=SPARK_HOME,
                              kernel_name=f"nb_{mode}", config={"launch_timeout": 240}).resolve()  # fmt: skip
        path = install(opts, kernels_dir / f"nb_{mode}", replace=True)
        if mode == "lazy":
            spec = json.loads((path / "kernel.json").read_text())
            spec["env"]["SPARK_GATEWAY_PROGRESS"] = "off"
            (path / "kernel.json").write_text(json.dumps(spec))
    return kernels_dir


class Client:
    """A started kernel client that runs cells and keeps every iopub message of each."""

    def __init__(self, km: AsyncKernelManager) -> None:
        self.km, self.kc = km, km.client()

    async def run(self, code: str, timeout: float = 120) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        msgs: list[dict[str, Any]] = []
        reply = await self.kc.execute_interactive(code, timeout=timeout, output_hook=msgs.append)
        return msgs, reply["content"]

    async def collect(self, msg_id: str, timeout: float = 120) -> list[dict[str, Any]]:
        """The iopub messages of request `msg_id` until the kernel goes idle."""
        msgs = []
        while True:
            msg = await self.kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return msgs
            msgs.append(msg)


@pytest_asyncio.fixture
async def client(managers) -> AsyncIterator[Any]:
    clients: list[Client] = []

    async def start(name: str, **environ: str) -> Client:
        km = managers(name)
        await km.start_kernel(env=env(**environ))
        c = Client(km)
        c.kc.start_channels()
        await c.kc.wait_for_ready(timeout=120)
        clients.append(c)
        return c

    yield start
    for c in clients:
        c.kc.stop_channels()


def text(msgs: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")


def displays(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in msgs if m["msg_type"] in ("display_data", "update_display_data")]


def progress(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in displays(msgs) if "sg-spark-progress" in m["content"]["data"].get("text/html", "")]


def api(km: AsyncKernelManager, host: LabHost, path: str) -> Any:
    """The driver's REST API (at the host's address: its UI URL names the lab host, which only the lab resolves)."""
    spark = km.provisioner.spark
    port = spark["ui_url"].rsplit(":", 1)[1]
    url = f"http://{host.address}:{port}/api/v1/applications/{spark['app_id']}/{path}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.asyncio
async def test_eager_kernel_real_objects_spark_magic_and_progress(lab, client, notebook_specs, spark_cluster):
    extra = "--conf spark.executor.memory=600m --conf " + shlex.quote("spark.sg.note=a b")
    host = lab.hosts[0]
    c = await client("nb_eager", KERNEL_REMOTE_HOST=host.name, KERNEL_EXTRA_SPARK_OPTS=extra)
    km = c.km
    app_id, ui = km.provisioner.spark["app_id"], km.provisioner.spark["ui_url"]

    msgs, reply = await c.run("print(type(spark).__name__, type(sc).__name__, type(sql).__name__)")
    lines = text(msgs).splitlines()
    assert reply["status"] == "ok" and lines[-1] == "SparkSession SparkContext method", lines
    assert lines[0].startswith(f"Spark application {app_id} ({km.kernel_id}) on {spark_cluster.url}")
    assert not progress(msgs)  # no Spark job, no display

    msgs, reply = await c.run(EIGHT_TASKS)
    assert reply["status"] == "ok" and text(msgs).strip().splitlines()[-1] == "28"
    shown = progress(msgs)
    assert shown[0]["msg_type"] == "display_data" and len(shown) >= 2, [m["msg_type"] for m in shown]
    assert {m["msg_type"] for m in shown[1:]} == {"update_display_data"}
    assert len({m["content"]["transient"]["display_id"] for m in shown}) == 1
    (job,) = api(km, host, "jobs?status=succeeded")[-1:]
    final = shown[-1]["content"]["data"]
    assert (
        f"Spark job {job['jobId']} done" in final["text/plain"]
        and "8/8 tasks, 0 active, 0 failed" in final["text/plain"]
    )
    assert f"{ui}/jobs/job/?id={job['jobId']}" in final["text/plain"]
    assert f'<a href="{ui}/jobs/job/?id={job["jobId"]}" target="_blank">' in final["text/html"]
    assert any("/8 tasks, 1 active" in m["content"]["data"]["text/plain"] for m in shown[:-1])  # seen running

    msgs, reply = await c.run("%spark")
    (shown,) = displays(msgs)
    plain, page = shown["content"]["data"]["text/plain"], shown["content"]["data"]["text/html"]
    for expected in ("state         ready", f"{app_id} ({km.kernel_id})", f"{spark_cluster.url}, deploy mode client",
                     f"Spark UI      {ui}", "executors     1: ", "(1 cores, ", f"--name {km.kernel_id} {extra}",
                     f"{extra} (KERNEL_EXTRA_SPARK_OPTS)", "job progress  on"):  # fmt: skip
        assert expected in plain, (expected, plain)
    assert f'<a href="{ui}" target="_blank">{ui}</a>' in page

    msgs, reply = await c.run("x = sum(range(10))")
    assert reply["status"] == "ok" and not displays(msgs)

    msgs, reply = await c.run("sc.parallelize([1], 1).map(lambda x: x / 0).count()")
    assert reply["status"] == "error"
    assert " failed " in progress(msgs)[-1]["content"]["data"]["text/plain"]

    msgs, reply = await c.run("%spark progress off")
    assert text(msgs).strip() == "Spark job progress is off"
    msgs, reply = await c.run(EIGHT_TASKS)
    assert reply["status"] == "ok" and text(msgs).strip() == "28" and not displays(msgs)
    msgs, reply = await c.run("%spark progress on\n%spark progress maybe")
    assert reply["status"] == "error" and "usage: %spark progress on|off" in json.dumps(msgs, default=str)
    msgs, reply = await c.run("print(spark.range(5).count())")
    assert progress(msgs) and "1/1 tasks" in progress(msgs)[-1]["content"]["data"]["text/plain"]


LONG = "sc.parallelize([0], 1).foreach(lambda _: __import__('time').sleep(3600))"


@pytest.mark.asyncio
async def test_lazy_kernel_proxies_env_switch_and_interrupt_cancels_only_the_cells_jobs(lab, client, notebook_specs):
    host = lab.hosts[1]
    c = await client("nb_lazy", KERNEL_REMOTE_HOST=host.name)
    msgs, reply = await c.run(
        "from pyspark import SparkContext\nfrom pyspark.sql import SparkSession\n"
        "print(isinstance(spark, SparkSession), isinstance(sc, SparkContext), callable(sql), type(spark).__name__,"
        " 'builder' in dir(spark), spark.__doc__ == SparkSession.__doc__)\n%spark"
    )
    assert reply["status"] == "ok" and text(msgs).strip() == "True True True _SparkName True True", text(msgs)
    report = displays(msgs)[0]["content"]["data"]["text/plain"]
    assert "state         starting (" in report  # %spark never waits
    assert "job progress  off (" in report  # SPARK_GATEWAY_PROGRESS=off in the kernelspec
    msgs, reply = await c.run("print(spark.range(3).count())")
    assert text(msgs).strip().splitlines()[-1] == "3" and not displays(msgs)
    msgs, reply = await c.run("%spark progress on")
    assert text(msgs).strip() == "Spark job progress is on"

    # A job of another thread (no cell's group) holds the application's only core; the cell's job waits for it.
    msgs, reply = await c.run(f"app = sc.applicationId\nimport threading\n"
                              f"background = threading.Thread(target=lambda: {LONG})\nbackground.start()\n"
                              "print(type(spark).__name__, type(sc).__name__)")  # fmt: skip
    assert text(msgs).strip().splitlines()[-1] == "SparkSession SparkContext", text(msgs)
    km = c.km
    while not api(km, host, "jobs?status=running"):
        await asyncio.sleep(0.2)
    (other,) = [j["jobId"] for j in api(km, host, "jobs?status=running")]

    msg_id = c.kc.execute(LONG)
    while len(api(km, host, "jobs?status=running")) < 2:
        await asyncio.sleep(0.2)
    (mine,) = [j["jobId"] for j in api(km, host, "jobs?status=running") if j["jobId"] != other]
    await asyncio.sleep(1.0)  # the display shows the waiting job
    await km.interrupt_kernel()
    msgs = await c.collect(msg_id)
    reply = await c.kc.get_shell_msg(timeout=60)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert mine in [j["jobId"] for j in api(km, host, "jobs?status=failed")]
    assert [j["jobId"] for j in api(km, host, "jobs?status=running")] == [other]  # not the cell's: still running
    shown = progress(msgs)
    assert f"Spark job {mine} running" in shown[0]["content"]["data"]["text/plain"]
    assert f"Spark job {mine} cancelled" in shown[-1]["content"]["data"]["text/plain"]
    assert f"Spark job {other}" not in json.dumps(shown, default=str)

    msgs, reply = await c.run("sc.cancelAllJobs(); background.join(60); print(background.is_alive())")
    assert text(msgs).strip().splitlines()[-1] == "False"  # its job was cancelled (its traceback above)


def test_progress_switch_and_text_rendering() -> None:
    """Pure logic of spark_notebook.py: the env switch, and the text form of jobs in each state."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "kernel-launchers" / "python" / "scripts"))
    import spark_notebook as nb

    assert nb.progress_enabled({}) and nb.progress_enabled({"SPARK_GATEWAY_PROGRESS": "on"})
    assert not any(nb.progress_enabled({"SPARK_GATEWAY_PROGRESS": v}) for v in ("off", "OFF", "0", "false", "no"))
    job = nb.JobView(4, "RUNNING", [1, 2], seen=100.0)
    job.stages = {1: nb.StageView(1, "map at x.py:1", 4, 4, 0, 0, 90.0), 2: nb.StageView(2, "collect at x.py:2", 8,
                                                                                            3, 2, 1, 95.0)}  # fmt: skip
    text = nb.render_text([job], "http://h:4040/", now=101.5, interrupted=False)
    first, *stages = text.splitlines()
    assert first == ("Spark job 4 running   [###########---------] 7/12 tasks, 2 active, 1 failed, 11.5 s  "
                     "collect at x.py:2  http://h:4040/jobs/job/?id=4")  # fmt: skip
    assert stages == ["  stage 1: 4/4 tasks, 0 active, 0 failed  map at x.py:1",
                      "  stage 2: 3/8 tasks, 2 active, 1 failed  collect at x.py:2"]  # fmt: skip
    job.status, job.stages[2] = "SUCCEEDED", nb.StageView(2, "collect at x.py:2", 8, 0, 0, 0, None)
    assert job.tasks == (4, 4, 0, 0)  # a finished job's stage that never ran was skipped (its output reused)
    job.stages[2] = nb.StageView(2, "collect at x.py:2", 8, 3, 2, 1, 95.0)
    job.status, job.ended = "FAILED", 103.0
    assert nb.render_text([job], None, 200.0, interrupted=True).startswith("Spark job 4 cancelled ")
    assert " 13.0 s " in nb.render_text([job], None, 200.0, interrupted=False)
    assert nb.render_text([job], None, 200.0, interrupted=False).startswith("Spark job 4 failed    ")
    html = nb.render_html([job], "http://h:4040", 200.0, interrupted=False)
    assert '<a href="http://h:4040/jobs/job/?id=4" target="_blank">4</a>' in html and "collect at x.py:2" in html
