"""Spark Connect kernels against lazy driver kernels on a namespace host (over SSH), Spark local; prints ratios.

- second kernel: from start_kernel to the first query's result for a connect kernel (user level) of a user whose
  engine runs, against a lazy driver kernel's (`--spark-init-mode lazy`), alternately (target ratio <= 0.3);
- restart: from restart_kernel to the first query's result, a connect kernel reading a temp view that survived the
  restart (same session), against a lazy driver kernel's first query (target ratio <= 0.3);
- memory: resident memory of everything on the host (kernels, their JVMs, the engine) with N kernels of one user
  that each ran a query: user-level connect kernels against driver kernels (reported).

    python -m bench.connect [--runs 3] [--kernels 6] [--master local[2]]      (root: it starts namespace hosts)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from jupyter_client import AsyncKernelManager

from bench.common import bench_lab
from spark_gateway.specs import SpecOptions, install
from testlab.hostlab import LabHost
from testlab.spark_cluster import SPARK_HOME

ENV = {"KERNEL_USERNAME": "bench"}
QUERY = "print('n', spark.range(1000).count())"
VIEW_QUERY = "print('n', spark.table('kept').count())"


async def run(km: AsyncKernelManager, code: str) -> None:
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=300)
        reply = await kc.execute_interactive(code, timeout=600, output_hook=lambda msg: None)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()


async def first_query(km: AsyncKernelManager, code: str = QUERY) -> float:
    """Seconds from start_kernel to the result of the kernel's first query."""
    started = time.perf_counter()
    await km.start_kernel(env=ENV)
    await run(km, code)
    return time.perf_counter() - started


async def after_restart(km: AsyncKernelManager, code: str) -> float:
    started = time.perf_counter()
    await km.restart_kernel()
    await run(km, code)
    return time.perf_counter() - started


def host_rss_mb(host: LabHost) -> float:
    """Resident memory (MiB) of every process on the host."""
    total = 0
    for pid, _ in host.processes():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


async def memory(make: object, name: str, host: LabHost, kernels: int) -> float:
    managers = [make(name) for _ in range(kernels)]  # type: ignore[operator]
    try:
        for km in managers:  # one after the other: 2 cores
            await first_query(km)
        await asyncio.sleep(3)
        return host_rss_mb(host)
    finally:
        await asyncio.gather(*(km.shutdown_kernel(now=True) for km in managers))


async def main(runs: int, kernels: int, master: str) -> None:
    with bench_lab(1, engine_idle_timeout=30.0) as (lab, kdir, manager):
        host = lab.hosts[0]
        for name, mode in (("spark_lazy", "lazy"), ("spark_connect", "connect")):
            options = SpecOptions(spark=True, spark_master=master, spark_home=SPARK_HOME, spark_init_mode=mode,
                                  share_level="user", interpreter=sys.executable, kernel_name=name)  # fmt: skip
            opts, _ = options.resolve()
            install(opts, kdir / name)
        engine = manager("spark_connect")
        await first_query(engine)  # the user's engine runs from now on
        second: dict[str, list[float]] = {"connect": [], "lazy": []}
        restart: dict[str, list[float]] = {"connect": [], "lazy": []}
        for _ in range(runs):
            for kind, name in (("connect", "spark_connect"), ("lazy", "spark_lazy")):
                km = manager(name)
                second[kind].append(await first_query(km))
                if kind == "connect":
                    await run(km, "spark.range(10).createOrReplaceTempView('kept')")
                restart[kind].append(await after_restart(km, VIEW_QUERY if kind == "connect" else QUERY))
                await km.shutdown_kernel()
        await engine.shutdown_kernel()
        mem = {"connect": await memory(manager, "spark_connect", host, kernels)}
        mem["lazy"] = await memory(manager, "spark_lazy", host, kernels)

    med = {k: {kind: statistics.median(v) for kind, v in d.items()} for k, d in (("second", second),
                                                                                  ("restart", restart))}  # fmt: skip
    print(f"Spark Connect benchmark: {runs} runs each on a namespace host over SSH, master {master}")
    print(f"  second kernel of a user, start to first result: connect {med['second']['connect']:.2f} s   lazy driver "
          f"{med['second']['lazy']:.2f} s   ratio {med['second']['connect'] / med['second']['lazy']:.2f}"
          "  (target <= 0.30)")  # fmt: skip
    print(f"  restart_kernel to first result: connect (temp view kept) {med['restart']['connect']:.2f} s   lazy "
          f"driver {med['restart']['lazy']:.2f} s   ratio {med['restart']['connect'] / med['restart']['lazy']:.2f}"
          "  (target <= 0.30)")  # fmt: skip
    print(f"  host memory with {kernels} kernels of one user: user-level connect {mem['connect']:.0f} MiB   driver "
          f"kernels {mem['lazy']:.0f} MiB   ratio {mem['connect'] / mem['lazy']:.2f}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kernels", type=int, default=6)
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.kernels, args.master))
