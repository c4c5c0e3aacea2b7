"""Kernels on SSH hosts through a real `jupyter server` and its REST + websocket API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from testlab.jupyter_rest import AUTH, jupyter_server, run_code
from tests.conftest import kernel_processes, wait_for


@pytest.fixture(scope="module")
def server(lab, kernels_dir, tmp_path_factory) -> Iterator[str]:
    with jupyter_server(lab, tmp_path_factory.mktemp("server"), [kernels_dir / "ssh_python"]) as base:
        yield base


@pytest.mark.asyncio
async def test_rest_lifecycle_on_remote_hosts(lab, server):
    r = requests.post(f"{server}/api/kernels", json={"name": "ssh_python"}, headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    kernel_id = r.json()["id"]
    whoami = "import socket, os; print(socket.gethostname(), os.getpid())"
    hostname, pid = (await run_code(server, kernel_id, whoami)).split()
    host = next(h for h in lab.hosts if h.hostname == hostname)
    assert kernel_processes(host, kernel_id)

    assert requests.post(f"{server}/api/kernels/{kernel_id}/interrupt", headers=AUTH, timeout=30).status_code == 204
    r = requests.post(f"{server}/api/kernels/{kernel_id}/restart", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    hostname2, pid2 = (await run_code(server, kernel_id, whoami)).split()
    assert hostname2 == hostname and pid2 != pid

    assert requests.delete(f"{server}/api/kernels/{kernel_id}", headers=AUTH, timeout=60).status_code == 204
    assert wait_for(lambda: not kernel_processes(host, kernel_id), 1.0)


def test_rest_refuses_a_hostile_kernel_id(lab, server):
    evil = "k; touch /tmp/sg-pwned-rest"
    r = requests.post(f"{server}/api/kernels", json={"name": "ssh_python", "kernel_id": evil}, headers=AUTH, timeout=60)
    assert r.status_code == 400
    assert "is not a valid id" in r.json()["message"]
    assert not Path("/tmp/sg-pwned-rest").exists()
    assert all("sg-pwned" not in cmd for h in lab.hosts for _, cmd in h.processes())
