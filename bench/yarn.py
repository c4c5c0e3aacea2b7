"""YARN kernel benchmark against the YARN lab (testlab/yarn_lab.py): kernels on a namespace host over SSH, a real
ResourceManager and two NodeManagers; prints medians and ratios against references measured in the same run.

- lazy: start-to-ready of a lazy YARN kernel against the plain `ssh_python` kernel on the same host (target <= 1.05);
- eager: start-to-ready of an eager YARN kernel (its application is RUNNING before it is ready) against a bare
  `spark-submit --master yarn --deploy-mode client` reaching a SparkSession on the same host with the same settings
  (target <= 1.05);
- jars: a bare application's start with pyspark's jars pre-staged (`spark.yarn.jars=local:...`) against Spark's
  default (zip and upload SPARK_HOME/jars for every application): reported;
- shutdown: from `shutdown_kernel()` until the RM reports the application ended and its containers released
  (target <= 3 s).

    python bench/yarn.py [--runs 3]      (root: it starts namespace hosts and a YARN cluster; make yarn-lab first)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jupyter_client import AsyncKernelManager

from bench.common import bench_lab, until_ready
from bench.spark import BARE_SCRIPT, gone, median_ms, settle
from spark_gateway.specs import SpecOptions, install
from testlab.hostlab import LabHost
from testlab.spark_cluster import SPARK_HOME
from testlab.yarn_lab import YarnLab

SMALL = "--conf spark.yarn.am.memory=512m --executor-memory 512m --num-executors 1 --executor-cores 1"
JARS = f"local:{SPARK_HOME}/jars/*"
ENDED = ("FINISHED", "KILLED", "FAILED")


def bare_submit(host: LabHost, yarn: YarnLab, script: Path, *confs: str) -> float:
    """Seconds from starting `spark-submit --master yarn` on `host` until the script has a SparkSession."""
    env = ["env", f"HADOOP_CONF_DIR={yarn.conf_dir}", f"YARN_CONF_DIR={yarn.conf_dir}"]
    submit = [f"{SPARK_HOME}/bin/spark-submit", "--master", "yarn", "--deploy-mode", "client", *SMALL.split()]
    cmd = [*host._nsenter(), *env, *submit, *confs, str(script)]  # noqa: SLF001
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY"):
            ready = time.perf_counter() - started
            break
    else:
        raise RuntimeError(f"spark-submit --master yarn exited ({proc.wait()}) without a SparkSession")
    proc.wait()
    return ready


async def released(yarn: YarnLab, app_id: str) -> dict[str, Any]:
    """Wait until the RM reports `app_id` ended and no container process of it is left on the NodeManager hosts
    (an ended application's record shows no running containers at once: the processes are what counts)."""
    while True:
        app = await asyncio.to_thread(yarn.app, app_id)
        if app["state"] in ENDED and not await asyncio.to_thread(yarn.app_containers, app_id):
            return app
        await asyncio.sleep(0.05)


async def timed_shutdown(km: AsyncKernelManager, host: LabHost, yarn: YarnLab, app_id: str) -> dict[str, float]:
    """Shut the kernel down; seconds from the call until the kernel's processes are gone from its host ("exit"),
    the RM's finishedTime ("finished", the AM unregistered and its container is done) and the containers are
    released ("shutdown")."""
    began, wall = time.perf_counter(), time.time()
    done = asyncio.ensure_future(km.shutdown_kernel())
    while not await asyncio.to_thread(gone, host, km.kernel_id):  # off the loop: shutdown_kernel runs on it
        await asyncio.sleep(0.02)
    exited = time.perf_counter() - began
    app = await released(yarn, app_id)
    total = time.perf_counter() - began
    await done
    return {"exit": exited, "finished": app["finishedTime"] / 1000 - wall, "shutdown": total}


async def main(runs: int) -> None:
    times: dict[str, list[float]] = {
        key: [] for key in ("plain", "lazy", "eager", "bare", "exit", "finished", "shutdown")
    }
    with bench_lab(3) as (lab, kernels, manager):
        yarn = YarnLab.start(lab)
        try:
            host = lab.hosts[0]
            env = {"KERNEL_USERNAME": "bench", "KERNEL_REMOTE_HOST": host.name}
            for mode in ("lazy", "eager"):
                opts, _ = SpecOptions(spark=True, spark_master="yarn", spark_home=SPARK_HOME, spark_init_mode=mode,
                                      interpreter=sys.executable, kernel_name=f"yarn_{mode}", extra_spark_opts=SMALL,
                                      hadoop_conf_dir=str(yarn.conf_dir), yarn_jars=JARS,
                                      config={"launch_timeout": 600}).resolve()  # fmt: skip
                install(opts, kernels / opts.kernel_name)
            script = kernels.parent / "bare.py"
            script.write_text(BARE_SCRIPT)
            for i in range(runs + 1):  # the first round warms up (key pair, SSH connection, page cache)
                round_: dict[str, float] = {}
                for name, key in (("ssh_python", "plain"), ("yarn_lazy", "lazy"), ("yarn_eager", "eager")):
                    km = manager(name)
                    round_[key] = await until_ready(km, env)
                    if key == "lazy":  # its session starts in the background: let it finish before measuring more
                        await _wait_session(km)
                    app_id = (km.provisioner.spark or {}).get("app_id")
                    if app_id and key == "eager":
                        round_.update(await timed_shutdown(km, host, yarn, app_id))
                    else:
                        await km.shutdown_kernel()
                        if app_id:
                            await released(yarn, app_id)
                    await settle(host, km.kernel_id)
                round_["bare"] = await asyncio.to_thread(bare_submit, host, yarn, script, "--conf",
                                                         f"spark.yarn.jars={JARS}")  # fmt: skip
                if i:
                    for key, value in round_.items():
                        times[key].append(value)
            uploaded = await asyncio.to_thread(bare_submit, host, yarn, script)
            staged = times["bare"][-1]
        finally:
            yarn.stop()

    med = {key: statistics.median(values) for key, values in times.items()}
    print(f"YARN kernel benchmark: {runs} runs each on a namespace host over SSH, a ResourceManager + 2 NodeManagers")
    print(f"  lazy  start-to-ready {median_ms(times['lazy'])}   plain ssh_python {median_ms(times['plain'])}"
          f"   ratio {med['lazy'] / med['plain']:.2f}  (target <= 1.05)")  # fmt: skip
    print(f"  eager start-to-ready {median_ms(times['eager'])}   bare spark-submit --master yarn to SparkSession "
          f"{median_ms(times['bare'])}   ratio {med['eager'] / med['bare']:.2f}  (target <= 1.05)")  # fmt: skip
    print(f"  application start: jars pre-staged (local:) {staged * 1000:8.1f} ms   default upload of SPARK_HOME/jars "
          f"{uploaded * 1000:8.1f} ms   ratio {staged / uploaded:.2f}  (reported)")  # fmt: skip
    print(f"  shutdown -> application ended, containers released {median_ms(times['shutdown'])} "
          f"(max {max(times['shutdown']) * 1000:.1f} ms)  (target <= 3000 ms)")  # fmt: skip
    print(f"    of which: kernel gone from its host {median_ms(times['exit'])}, RM finishedTime "
          f"{median_ms(times['finished'])} (AM unregistered, its container done)")  # fmt: skip
    print(f"  load average at the end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


async def _wait_session(km: object, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    provisioner = km.provisioner  # type: ignore[attr-defined]
    while (provisioner.spark or {}).get("state") == "starting" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.runs))
