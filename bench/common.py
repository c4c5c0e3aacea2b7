"""What the benchmarks share: the LocalProvisioner reference kernelspec, and timing a kernel until it is ready."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import zmq
from jupyter_client import AsyncKernelManager


def write_local_spec(kernels: Path, name: str = "local_python") -> None:
    """A plain ipykernel spec that jupyter_client starts with its own LocalProvisioner: the reference."""
    (kernels / name).mkdir(parents=True)
    (kernels / name / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Local Python",
                "language": "python",
                "interrupt_mode": "signal",
            }
        )
    )


async def until_ready(km: AsyncKernelManager, env: dict[str, str], timeout: float = 120) -> float:
    """Start the kernel and wait for its kernel_info reply; returns the seconds that took."""
    started = time.perf_counter()
    await km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    # jupyter_client's kernel_info send can block the whole loop when a kernel never comes up (seen with
    # 24 LocalProvisioner kernels at once on 2 cores): bound it so such a kernel counts as failed
    kc.shell_channel.socket.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    try:
        await kc.wait_for_ready(timeout=timeout)
    finally:
        kc.stop_channels()
    return time.perf_counter() - started
