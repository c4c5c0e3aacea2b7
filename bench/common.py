"""What the benchmarks share: a lab of namespace hosts with the gateway configured for it, the LocalProvisioner
reference kernelspec, and timing a kernel until it is ready."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import zmq
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager

from testlab.gateway import gateway_config, write_spec
from testlab.hostlab import HostLab

Managers = Callable[[str], AsyncKernelManager]


@contextmanager
def bench_lab(hosts: int, **config: object) -> Iterator[tuple[HostLab, Path, Managers]]:
    """`hosts` namespace hosts, a kernels dir holding `ssh_python` and `local_python` (add more there), and a
    factory of kernel managers by spec name, with the gateway configured for the lab (plus `config`)."""
    lab = HostLab.start(hosts)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            kernels = Path(tmp) / "kernels"
            write_spec(kernels / "ssh_python")
            write_local_spec(kernels)
            ksm = KernelSpecManager(kernel_dirs=[str(kernels)])
            cfg = gateway_config(lab, **{"host_quarantine": 5.0, **config})  # the default quarantine

            def manager(name: str) -> AsyncKernelManager:
                return AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm, config=cfg)

            yield lab, kernels, manager
    finally:
        lab.stop()


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
    kc.start_channels(hb=False)  # a REQ socket with no kernel behind it blocks stop_channels() forever
    # jupyter_client's kernel_info send can block the whole loop when a kernel never comes up (seen with
    # 24 LocalProvisioner kernels at once on 2 cores): bound it so such a kernel counts as failed
    kc.shell_channel.socket.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    try:
        await kc.wait_for_ready(timeout=timeout)
    finally:
        kc.stop_channels()
    return time.perf_counter() - started
