"""Shared fixtures: real SSH hosts (network namespaces), installed kernelspecs, kernel managers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager

from spark_gateway.gateway import Gateway
from spark_gateway.health import Health
from testlab.gateway import USER_ENV, env, gateway_config, write_spec
from testlab.hostlab import HostLab, LabHost
from testlab.spark_cluster import SparkCluster
from testlab.yarn_lab import YarnLab

__all__ = ["USER_ENV", "env", "gateway_config"]  # tests import these from here too


@pytest.fixture(scope="session")
def lab() -> Iterator[HostLab]:
    """Three real SSH hosts, each in its own network, mount and UTS namespace."""
    lab = HostLab.start(3)
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="session")
def spark_cluster(lab: HostLab) -> Iterator[SparkCluster]:
    """The shared standalone cluster (started on first use, stopped at the end of the session)."""
    cluster = SparkCluster.start(lab)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def yarn_lab(lab: HostLab) -> Iterator[YarnLab]:
    """The shared YARN cluster (started on first use by a YARN test, stopped at the end of the session)."""
    yarn = YarnLab.start(lab)
    try:
        yield yarn
    finally:
        yarn.stop()


@pytest.fixture(autouse=True)
def fresh_host_health() -> None:
    """Each test starts as a fresh gateway would: no host remembered as failed by an earlier test."""
    for cluster in Gateway.instance().clusters():
        cluster.health = Health()


@pytest.fixture(scope="session")
def kernels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernels directory on the filesystem the lab hosts share with us, holding `ssh_python`."""
    root = tmp_path_factory.mktemp("kernels")
    write_spec(root / "ssh_python")
    return root


def add_spec(kernels_dir: Path, name: str, edit: Callable[[dict], None]) -> str:
    """A variant of `ssh_python` with kernel.json edited by `edit`."""
    path = write_spec(kernels_dir / name, replace=True)
    spec = json.loads((path / "kernel.json").read_text())
    edit(spec)
    (path / "kernel.json").write_text(json.dumps(spec))
    return name


@contextlib.asynccontextmanager
async def kernel_managers(
    lab: HostLab, kernels_dir: Path, **options: Any
) -> AsyncIterator[Callable[..., AsyncKernelManager]]:
    """Factory of kernel managers of the specs in `kernels_dir`, with the gateway configured for the lab (`options`,
    then the factory call's own config, on top); every kernel still running at the end is shut down."""
    made: list[AsyncKernelManager] = []

    def make(kernel_name: str = "ssh_python", **config: Any) -> AsyncKernelManager:
        km = AsyncKernelManager(
            kernel_name=kernel_name,
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels_dir)]),
            config=gateway_config(lab, **(options | config)),
        )
        made.append(km)
        return km

    yield make
    for km in made:
        if km.has_kernel:
            await km.shutdown_kernel(now=True)


@pytest_asyncio.fixture
async def managers(lab: HostLab, kernels_dir: Path) -> AsyncIterator[Callable[..., AsyncKernelManager]]:
    """Factory of kernel managers on the lab; every kernel still running at the end is shut down."""
    async with kernel_managers(lab, kernels_dir) as make:
        yield make


def kernel_processes(host: LabHost, kernel_id: str) -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, cmd in host.processes() if kernel_id in cmd]


async def eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    """Like `wait_for`, but lets the event loop (and the gateway's background tasks) run meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


async def execute(km: AsyncKernelManager, code: str, timeout: float = 60) -> tuple[str, dict]:
    """Run `code` in the kernel; returns (stdout text, execute_reply content)."""
    kc = km.client()
    kc.start_channels(hb=False)  # a REQ socket with no kernel behind it blocks stop_channels() forever
    try:
        await kc.wait_for_ready(timeout=60)
        out: list[str] = []

        def hook(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append("\n".join(msg["content"]["traceback"]))

        reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return "".join(out), reply["content"]
    finally:
        kc.stop_channels()
