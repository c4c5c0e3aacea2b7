"""Placement benchmark: 24 kernels started at once over 3 namespace hosts (least-connection), then the same with one
host's sshd stopped halfway, against 24 LocalProvisioner kernels started at once in the same run.

Prints the spread per host and the wall-time ratios (target <= 1.2).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter

from jupyter_client import AsyncKernelManager

from bench.common import bench_lab, until_ready


async def burst(kms: list[AsyncKernelManager], env: dict[str, str], midway=None) -> tuple[float, list]:
    """Start every kernel at once; `midway` runs once half of them are ready. Returns wall time and outcomes."""
    done = 0

    async def one(km: AsyncKernelManager) -> None:
        nonlocal done
        await until_ready(km, env)
        done += 1
        if midway is not None and done == len(kms) // 2:
            midway()

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(one(km) for km in kms), return_exceptions=True)
    return time.perf_counter() - started, outcomes


async def main(count: int) -> None:
    user = {"KERNEL_USERNAME": "bench"}
    with bench_lab(3, load_balancing_algorithm="least-connection", ssh_connect_timeout=2.0) as (lab, _, manager):

        async def run(name: str, env: dict[str, str], midway=None) -> tuple[float, Counter, int]:
            kms = [manager(name) for _ in range(count)]
            wall, outcomes = await burst(kms, env, midway)
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            failed = len(errors)
            if errors:
                print(f"  {failed} of {count} failed; the first: {errors[0]}", file=sys.stderr)
            hosts = Counter(km.provisioner.host for km in kms if km.has_kernel and name == "ssh_python")
            await asyncio.gather(*(km.shutdown_kernel(now=True) for km in kms if km.has_kernel))
            return wall, hosts, failed

        await run("ssh_python", user)  # warm up: key pair, SSH connections, imports
        local, _, _ = await run("local_python", {})
        remote, spread, failed = await run("ssh_python", user)
        local2, _, _ = await run("local_python", {})
        victim = lab.hosts[2]
        faulty, spread2, failed2 = await run("ssh_python", user, midway=victim.stop_sshd)
        victim.start_sshd()

    print(f"placement benchmark: {count} kernels started at once over 3 hosts (least-connection)")
    print(
        f"  all hosts up:        {remote:6.2f} s  spread {dict(sorted(spread.items()))}  failed {failed}"
        f"   LocalProvisioner x{count}: {local:6.2f} s   ratio {remote / local:.2f}  (target <= 1.2)"
    )
    print(
        f"  sshd of {victim.name} stopped halfway: {faulty:6.2f} s  spread {dict(sorted(spread2.items()))}"
        f"  failed {failed2}   ratio {faulty / local2:.2f} against LocalProvisioner {local2:.2f} s"
    )
    even = bool(spread) and max(spread.values()) - min(spread.values()) <= 1
    print(f"  spread within one of even: {even}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=24)
    asyncio.run(main(parser.parse_args().count))
