"""Launch benchmark: an `ssh_python` kernel on a remote (namespace) host against jupyter_client's LocalProvisioner.

Measured alternately in the same run, so the machine's noise hits both alike. Prints medians and ratios:
start-to-ready latency, the largest event-loop stall during launch and shutdown, and the time until the remote
kernel process is gone after shutdown starts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from jupyter_client import AsyncKernelManager

from bench.common import bench_lab, until_ready

USER = {"KERNEL_USERNAME": "bench"}


class StallMeter:
    """Largest lateness of a 5 ms ticker on the event loop while active."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, time.perf_counter() - before - 0.005)

    def __enter__(self) -> StallMeter:
        self.worst = 0.0
        self._task = asyncio.ensure_future(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def one_kernel(km: AsyncKernelManager, env: dict[str, str], gone: callable | None) -> dict[str, float]:
    meter = StallMeter()
    with meter:
        ready = await until_ready(km, env)
        launch_stall = meter.worst
    with meter:
        stopping = time.perf_counter()
        await km.shutdown_kernel()
        shutdown_stall = meter.worst
    gone_after = None
    if gone is not None:
        while not gone():
            await asyncio.sleep(0.005)
        gone_after = time.perf_counter() - stopping
    return {"ready": ready, "launch_stall": launch_stall, "shutdown_stall": shutdown_stall, "gone": gone_after}


async def main(runs: int) -> None:
    results: dict[str, list[dict]] = {"remote": [], "local": []}
    with bench_lab(1) as (lab, _, manager):
        host = lab.hosts[0]
        for i in range(runs + 1):  # the first pair warms up (key pair, SSH connection, imports)
            remote = manager("ssh_python")

            def gone(km: AsyncKernelManager = remote) -> bool:
                return not any(km.kernel_id in cmd for _, cmd in host.processes())

            r = await one_kernel(remote, USER, gone)
            loc = await one_kernel(manager("local_python"), {}, None)
            if i:
                results["remote"].append(r)
                results["local"].append(loc)

    def med(side: str, key: str) -> float:
        return statistics.median(x[key] for x in results[side])

    print(f"launch benchmark: {runs} remote (ssh_python over SSH to a namespace host) and {runs} local kernels")
    remote, local = med("remote", "ready"), med("local", "ready")
    print(
        f"  start-to-ready   remote {remote * 1000:7.1f} ms   local {local * 1000:7.1f} ms"
        f"   ratio remote/local {remote / local:.2f}  (target <= 1.10)"
    )
    print(
        f"  loop stall launch   remote {med('remote', 'launch_stall') * 1000:6.1f} ms   local "
        f"{med('local', 'launch_stall') * 1000:6.1f} ms   (target remote <= 20 ms)"
    )
    print(
        f"  loop stall shutdown remote {med('remote', 'shutdown_stall') * 1000:6.1f} ms   local "
        f"{med('local', 'shutdown_stall') * 1000:6.1f} ms"
    )
    print(f"  worst stall over all remote runs {max(x['launch_stall'] for x in results['remote']) * 1000:.1f} ms")
    print(f"  remote process gone {med('remote', 'gone') * 1000:.1f} ms after shutdown began (target <= 1000 ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    asyncio.run(main(parser.parse_args().runs))
