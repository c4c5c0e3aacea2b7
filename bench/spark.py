"""Spark kernel benchmark on a namespace host (over SSH), Spark in local mode; prints medians and ratios.

- lazy: start-to-ready of an `ssh_python_spark` lazy kernel against the plain `ssh_python` kernel, alternately on
  the same host (target ratio <= 1.3);
- eager: start-to-ready of an eager kernel (its SparkSession exists before it is ready) against a bare
  `spark-submit` of a script that creates a SparkSession, run on the same host without SSH (target <= 1.05);
- interrupt: from interrupting a cell that runs a Spark job until the driver reports the job failed (cancelled),
  and until the cell's KeyboardInterrupt reply arrives (target <= 2 s);
- progress: a cell running a job of 200 short tasks with the live progress display on against off, alternately in
  the same kernel (target ratio <= 1.03), and the kernel's CPU time while idle with progress on against off (target:
  no measurable increase: the progress thread sleeps while no cell runs).

    python bench/spark.py [--runs 5] [--master local[2]]      (root: it starts namespace hosts)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from jupyter_client import AsyncKernelManager

from bench.common import bench_lab, until_ready
from spark_gateway.specs import SpecOptions, install
from testlab.hostlab import LabHost
from testlab.spark_cluster import SPARK_HOME

ENV = {"KERNEL_USERNAME": "bench"}
BARE_SCRIPT = "from pyspark.sql import SparkSession\nSparkSession.builder.getOrCreate()\nprint('READY', flush=True)\n"
LONG_JOB = "sc.parallelize([0], 1).foreach(lambda _: __import__('time').sleep(3600))"
SHORT_TASKS = "sc.parallelize(range(200), 200).map(lambda x: x * x).sum()"
CPU = "import os; print(sum(os.times()[:2]))"
IDLE = 10.0  # seconds of idleness measured per setting


def gone(host: LabHost, kernel_id: str) -> bool:
    return not any(kernel_id in cmd for _, cmd in host.processes())


async def settle(host: LabHost, kernel_id: str) -> None:
    """Wait until nothing of the kernel is left (so runs do not overlap)."""
    while not gone(host, kernel_id):
        await asyncio.sleep(0.05)


async def time_to_ready(km: AsyncKernelManager, host: LabHost) -> float:
    ready = await until_ready(km, ENV)
    await km.shutdown_kernel()
    await settle(host, km.kernel_id)
    return ready


def bare_spark_submit(host: LabHost, script: Path, master: str) -> float:
    """Seconds from starting `spark-submit script` on `host` until the script has a SparkSession."""
    cmd = [*host._nsenter(), f"{SPARK_HOME}/bin/spark-submit", "--master", master, str(script)]  # noqa: SLF001
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY"):
            ready = time.perf_counter() - started
            break
    else:
        raise RuntimeError(f"spark-submit {script} exited ({proc.wait()}) without a SparkSession")
    proc.wait()
    return ready


async def interrupt_latencies(km: AsyncKernelManager, host: LabHost, runs: int) -> list[tuple[float, float]]:
    """(job cancelled, reply received) seconds after each interrupt of a cell running a Spark job."""
    await km.start_kernel(env=ENV)
    kc = km.client()
    kc.start_channels(hb=False)
    await kc.wait_for_ready(timeout=120)
    spark = km.provisioner.spark
    port = spark["ui_url"].rsplit(":", 1)[1]
    api = f"http://{host.address}:{port}/api/v1/applications/{spark['app_id']}/jobs"

    def jobs(status: str) -> list[int]:
        with urllib.request.urlopen(f"{api}?status={status}", timeout=5) as reply:
            return [job["jobId"] for job in json.loads(reply.read())]

    results = []
    try:
        for _ in range(runs):
            kc.execute(LONG_JOB)
            while not (running := jobs("running")):
                await asyncio.sleep(0.02)
            interrupted = time.perf_counter()
            await km.interrupt_kernel()
            reply = asyncio.ensure_future(kc.get_shell_msg(timeout=60))
            replied: list[float] = []
            reply.add_done_callback(lambda _, t0=interrupted, out=replied: out.append(time.perf_counter() - t0))
            while running[0] not in jobs("failed"):
                await asyncio.sleep(0.01)
            cancelled = time.perf_counter() - interrupted
            assert (await reply)["content"].get("ename") == "KeyboardInterrupt"
            results.append((cancelled, replied[0]))
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    return results


async def run_cell(kc: Any, code: str) -> tuple[float, str]:
    """Seconds from sending `code` to its reply, and its stdout."""
    out: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    started = time.perf_counter()
    reply = await kc.execute_interactive(code, timeout=300, output_hook=hook)
    assert reply["content"]["status"] == "ok", reply["content"]
    return time.perf_counter() - started, "".join(out)


async def progress_costs(km: AsyncKernelManager, runs: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Cell seconds of the 200-task job per setting (alternating), and kernel CPU seconds while idle per setting."""
    await km.start_kernel(env=ENV)
    kc = km.client()
    kc.start_channels(hb=False)
    await kc.wait_for_ready(timeout=120)
    cells: dict[str, list[float]] = {"on": [], "off": []}
    idle: dict[str, float] = {}
    try:
        for _ in range(3):  # warm-up: JIT, Python workers
            await run_cell(kc, SHORT_TASKS)
        for _ in range(runs * 2):
            for setting in ("on", "off"):
                await run_cell(kc, f"%spark progress {setting}")
                cells[setting].append((await run_cell(kc, SHORT_TASKS))[0])
        for setting in ("off", "on"):
            await run_cell(kc, f"%spark progress {setting}")
            before = float((await run_cell(kc, CPU))[1])
            await asyncio.sleep(IDLE)
            idle[setting] = float((await run_cell(kc, CPU))[1]) - before
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    return cells, idle


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.1f} ms"


async def main(runs: int, master: str, progress_only: bool = False) -> None:
    times: dict[str, list[float]] = {"plain": [], "lazy": [], "eager": [], "bare": []}
    with bench_lab(1) as (lab, kernels, manager):
        host = lab.hosts[0]
        for mode in ("lazy", "eager"):
            opts, _ = SpecOptions(spark=True, spark_master=master, spark_home=SPARK_HOME, spark_init_mode=mode,
                                  interpreter=sys.executable, kernel_name=f"spark_{mode}").resolve()  # fmt: skip
            install(opts, kernels / opts.kernel_name)
        if progress_only:
            cells, idle = await progress_costs(manager("spark_lazy"), runs)
            print_progress(runs, master, cells, idle)
            return
        script = kernels.parent / "bare.py"
        script.write_text(BARE_SCRIPT)
        for i in range(runs + 1):  # the first round warms up (key pair, SSH connection, page cache)
            round_ = {
                "plain": await time_to_ready(manager("ssh_python"), host),
                "lazy": await time_to_ready(manager("spark_lazy"), host),
                "bare": await asyncio.to_thread(bare_spark_submit, host, script, master),
                "eager": await time_to_ready(manager("spark_eager"), host),
            }
            if i:
                for key, value in round_.items():
                    times[key].append(value)
        latencies = await interrupt_latencies(manager("spark_eager"), host, runs)
        cells, idle = await progress_costs(manager("spark_lazy"), runs)

    med = {key: statistics.median(values) for key, values in times.items()}
    print(f"Spark kernel benchmark: {runs} runs each on a namespace host over SSH, master {master}")
    print(f"  lazy  start-to-ready {median_ms(times['lazy'])}   plain ssh_python {median_ms(times['plain'])}"
          f"   ratio {med['lazy'] / med['plain']:.2f}  (target <= 1.30)")  # fmt: skip
    print(f"  eager start-to-ready {median_ms(times['eager'])}   bare spark-submit to SparkSession "
          f"{median_ms(times['bare'])}   ratio {med['eager'] / med['bare']:.2f}  (target <= 1.05)")  # fmt: skip
    cancelled, replied = [c for c, _ in latencies], [r for _, r in latencies]
    print(f"  interrupt -> job cancelled {median_ms(cancelled)} (max {max(cancelled) * 1000:.1f} ms)   "
          f"-> KeyboardInterrupt reply {median_ms(replied)}  (target <= 2000 ms)")  # fmt: skip
    print_progress(runs, master, cells, idle)


def print_progress(runs: int, master: str, cells: dict[str, list[float]], idle: dict[str, float]) -> None:
    on, off = statistics.median(cells["on"]), statistics.median(cells["off"])
    print(f"  progress display ({runs * 2} cells each, alternating, same kernel, master {master}):")
    print(f"  200-task job, progress on {median_ms(cells['on'])}   off {median_ms(cells['off'])}   "
          f"ratio {on / off:.3f}  (target <= 1.03)")  # fmt: skip
    print(f"  kernel CPU while idle {IDLE:g} s: progress on {idle['on'] * 1000:.0f} ms, off {idle['off'] * 1000:.0f} ms"
          "  (target: no measurable increase)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--progress-only", action="store_true", help="only the progress display's costs")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.master, args.progress_only))
