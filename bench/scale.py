"""Scale benchmark: a burst of 30 kernels over 3 namespace hosts (least-connection) against 30 LocalProvisioner
kernels at once in the same run; the gateway's idle CPU while every kernel is polled as jupyter_server polls it
(plain and tunnelled); a mass shutdown; and what one gateway holds per kernel (fds, threads, SSH channels).

Targets: all-ready ratio <= 1.15 (the median of interleaved local/remote rounds), 0 failed, spread 10/10/10;
idle <= 10 ms of gateway CPU per kernel-minute; every process gone <= 5 s after a mass shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from jupyter_client import AsyncKernelManager

from bench.common import bench_lab, until_ready
from spark_gateway.gateway import Gateway
from testlab.gateway import write_spec

POLL_INTERVAL = 3.0  # jupyter_server's restarter: is_alive() every KernelRestarter.time_to_dead (3 s)
SLOW_POLL = 10.0  # with c.KernelRestarter.time_to_dead = 10
USER = {"KERNEL_USERNAME": "bench"}


def gateway_resources() -> dict[str, int]:
    """File descriptors and threads of this (the gateway's) process, and SSH channels open on its connections."""
    channels = sum(
        len(getattr(client.get_transport(), "_channels", {}) or {})
        for cluster in Gateway.instance().clusters()
        for client in cluster.pool._clients.values()
        if client.get_transport() is not None
    )
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": threading.active_count(), "ssh_channels": channels}


def machine_cpu() -> float:
    """Seconds of CPU the whole machine has spent busy (every process, every lab host: they share the kernel)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


async def burst(kms: list[AsyncKernelManager], env: dict[str, str]) -> tuple[float, list, float]:
    """Wall seconds until every kernel answered, each outcome, and the machine's CPU ms per kernel meanwhile."""
    started, cpu = time.perf_counter(), machine_cpu()
    outcomes = await asyncio.gather(*(until_ready(km, env) for km in kms), return_exceptions=True)
    return time.perf_counter() - started, outcomes, (machine_cpu() - cpu) * 1000 / len(kms)


async def idle_cpu(kms: list[AsyncKernelManager], seconds: float, interval: float = POLL_INTERVAL) -> float:
    """Gateway CPU (ms, all threads) per kernel-minute while each kernel is polled every `interval` seconds."""

    async def poll(km: AsyncKernelManager) -> None:
        await asyncio.sleep(interval * (kms.index(km) / len(kms)))  # the restarters' phases are spread
        while True:
            if not await km.is_alive():
                raise RuntimeError(f"kernel {km.kernel_id} died while idle")
            await asyncio.sleep(interval)

    pollers = [asyncio.ensure_future(poll(km)) for km in kms]
    await asyncio.sleep(interval)  # every poller in its rhythm
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    for p in pollers:
        p.cancel()
    await asyncio.gather(*pollers, return_exceptions=True)
    return cpu * 1000 / (len(kms) * wall / 60)


async def mass_shutdown(kms: list[AsyncKernelManager], lab) -> float:
    """Seconds from asking every kernel to shut down (as DELETE /api/kernels/ID does) until no process is left."""
    ids = [km.kernel_id for km in kms if km.has_kernel]
    started = time.perf_counter()
    await asyncio.gather(*(km.shutdown_kernel() for km in kms if km.has_kernel), return_exceptions=True)
    while any(kid in cmd for h in lab.hosts for _, cmd in h.processes() for kid in ids):
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


def tunnelled_spec(kernels: Path) -> None:
    path = write_spec(kernels / "ssh_python_tunnel")
    spec = json.loads((path / "kernel.json").read_text())
    spec["metadata"]["kernel_provisioner"].setdefault("config", {})["enable_tunneling"] = True
    (path / "kernel.json").write_text(json.dumps(spec))


async def phase(what: str, aw, seconds: float = 600.0):
    """`aw` within `seconds`; on a timeout, say where the pending tasks wait, and raise."""
    try:
        return await asyncio.wait_for(aw, seconds)
    except asyncio.TimeoutError:
        print(f"  {what}: not done within {seconds:g} s; pending tasks wait at:", file=sys.stderr)
        for task in list(asyncio.all_tasks())[:8]:
            frames = task.get_stack(limit=6)
            print("   ", " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames)), file=sys.stderr)
        raise


async def main(count: int, idle_seconds: float, rounds: int) -> None:
    config = {"load_balancing_algorithm": "least-connection", "launch_timeout": 120.0}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"scale benchmark: {count} kernels at once over 3 hosts (least-connection); machine shared and noisy")
    with bench_lab(3, **config) as (lab, kernels, manager):
        tunnelled_spec(kernels)
        empty = gateway_resources()
        warm = [manager("ssh_python") for _ in range(3)]  # key pair, SSH connections, imports
        await phase("warm-up", burst(warm, USER))
        await asyncio.gather(*(km.shutdown_kernel(now=True) for km in warm if km.has_kernel))
        base = gateway_resources()

        ratios, remote_kms = [], []
        for turn in range(rounds):  # interleaved, so that a change in the machine's load hits both sides alike
            local_kms = [manager("local_python") for _ in range(count)]
            local, local_out, local_cpu = await phase("local burst", burst(local_kms, {}))
            await asyncio.gather(*(km.shutdown_kernel(now=True) for km in local_kms if km.has_kernel))
            local_failed = [o for o in local_out if isinstance(o, BaseException)]
            if remote_kms:  # the previous round's: only the last round's stay up for the idle phases
                await asyncio.gather(*(km.shutdown_kernel(now=True) for km in remote_kms if km.has_kernel))
            remote_kms = [manager("ssh_python") for _ in range(count)]
            remote, remote_out, remote_cpu = await phase("remote burst", burst(remote_kms, USER))
            failed = [o for o in remote_out if isinstance(o, BaseException)]
            spread = Counter(km.provisioner.host for km in remote_kms if km.has_kernel)
            if not local_failed:  # a reference kernel that failed (jupyter_client's port race) voids the round
                ratios.append(remote / local)
            print(
                f"  burst {turn + 1}/{rounds}: remote {remote:6.2f} s  LocalProvisioner {local:6.2f} s  "
                f"ratio {remote / local:.2f}  failed {len(failed)} (local {len(local_failed)})  "
                f"spread {dict(sorted(spread.items()))}  load {os.getloadavg()[0]:.1f}  "
                f"machine CPU per kernel {remote_cpu:.0f} ms (local {local_cpu:.0f} ms)",
                flush=True,
            )
            for label, errors in (("remote", failed), ("local", local_failed)):
                if errors:
                    print(f"    {label}: first failure: {errors[0]}", file=sys.stderr)
        median = f"{statistics.median(ratios):.2f}" if ratios else "none (every reference round failed)"
        print(f"  burst ratio, median of {len(ratios)} valid rounds: {median} (target <= 1.15)", flush=True)
        running = [km for km in remote_kms if km.has_kernel]
        idle = await phase("idle", idle_cpu(running, idle_seconds))
        idle_slow = await phase("idle (slow polls)", idle_cpu(running, idle_seconds, SLOW_POLL))
        held = gateway_resources()
        print(
            f"  idle, polled every {POLL_INTERVAL:g} s: {idle:.2f} ms CPU per kernel-minute (target <= 10); "
            f"every {SLOW_POLL:g} s (c.KernelRestarter.time_to_dead={SLOW_POLL:g}): {idle_slow:.2f}",
            flush=True,
        )
        per = {k: round((held[k] - base[k]) / count, 2) for k in held}
        print(f"  held: {count} kernels {held}; empty {empty}, warm {base}; per kernel {per}", flush=True)
        gone = await phase("mass shutdown", mass_shutdown(remote_kms, lab), 120.0)
        print(f"  mass shutdown, every process gone: {gone:.2f} s (target <= 5)", flush=True)

        tunnel_kms = [manager("ssh_python_tunnel") for _ in range(count)]
        tunnel_wall, tunnel_out, _ = await phase("tunnelled burst", burst(tunnel_kms, USER))
        tunnel_failed = [o for o in tunnel_out if isinstance(o, BaseException)]
        if tunnel_failed:
            print(f"    tunnelled: first failure: {tunnel_failed[0]}", file=sys.stderr)
        print(f"  tunnelled burst: {tunnel_wall:.2f} s, failed {len(tunnel_failed)}", flush=True)
        tunnel_idle = await phase("tunnelled idle", idle_cpu([km for km in tunnel_kms if km.has_kernel], idle_seconds))
        held_tunnel = gateway_resources()
        per_tunnel = {k: round((held_tunnel[k] - base[k]) / count, 2) for k in held}
        print(
            f"  tunnelled, idle, polled every {POLL_INTERVAL:g} s: {tunnel_idle:.2f} ms CPU per kernel-minute; "
            f"held {held_tunnel}, per kernel {per_tunnel}; RLIMIT_NOFILE {soft}/{hard}",
            flush=True,
        )
        gone_tunnel = await phase("tunnelled mass shutdown", mass_shutdown(tunnel_kms, lab), 120.0)
        print(f"  tunnelled mass shutdown, every process gone: {gone_tunnel:.2f} s", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved local/remote bursts; the median counts")
    args = parser.parse_args()
    asyncio.run(main(args.count, args.idle_seconds, args.rounds))
