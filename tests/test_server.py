"""Kernels on SSH hosts through a real `jupyter server` and its REST + websocket API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from tornado.websocket import websocket_connect

from tests.conftest import env, kernel_processes, wait_for

TOKEN = uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(lab, kernels_dir, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("server")
    (root / "jp" / "kernels").mkdir(parents=True)
    (root / "jp" / "kernels" / "ssh_python").symlink_to(kernels_dir / "ssh_python")
    port = _free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "jupyter"),
            "server",
            "--no-browser",
            f"--port={port}",
            "--ip=127.0.0.1",
            "--allow-root",
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
        ],
        env=env(
            JUPYTER_PATH=str(root / "jp"),
            JUPYTER_CONFIG_DIR=str(root / "cfg"),
            GP_REMOTE_HOSTS=",".join(h.name for h in lab.hosts),
            GP_SSH_CONFIG_FILE=str(lab.ssh_config),
        ),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/api/status", headers=_auth(), timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"jupyter server did not start: {(root / 'server.log').read_text()[-2000:]}")
        yield base
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def _auth() -> dict[str, str]:
    return {"Authorization": f"token {TOKEN}"}


async def _run_code(base: str, kernel_id: str, code: str) -> str:
    url = base.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?token={TOKEN}"
    ws = await websocket_connect(url)
    msg_id = uuid.uuid4().hex
    ws.write_message(
        json.dumps(
            {
                "header": {
                    "msg_id": msg_id,
                    "msg_type": "execute_request",
                    "username": "t",
                    "session": uuid.uuid4().hex,
                    "version": "5.3",
                    "date": "",
                },
                "parent_header": {},
                "metadata": {},
                "channel": "shell",
                "buffers": [],
                "content": {
                    "code": code,
                    "silent": False,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": True,
                },
            }
        )
    )
    out = []
    while True:
        raw = await ws.read_message()
        assert raw is not None, "websocket closed"
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            ws.close()
            return "".join(out)


@pytest.mark.asyncio
async def test_rest_lifecycle_on_remote_hosts(lab, server):
    r = requests.post(f"{server}/api/kernels", json={"name": "ssh_python"}, headers=_auth(), timeout=60)
    assert r.status_code == 201, r.text
    kernel_id = r.json()["id"]
    whoami = "import socket, os; print(socket.gethostname(), os.getpid())"
    hostname, pid = (await _run_code(server, kernel_id, whoami)).split()
    host = next(h for h in lab.hosts if h.hostname == hostname)
    assert kernel_processes(host, kernel_id)

    assert requests.post(f"{server}/api/kernels/{kernel_id}/interrupt", headers=_auth(), timeout=30).status_code == 204
    r = requests.post(f"{server}/api/kernels/{kernel_id}/restart", headers=_auth(), timeout=60)
    assert r.status_code == 200, r.text
    hostname2, pid2 = (await _run_code(server, kernel_id, whoami)).split()
    assert hostname2 == hostname and pid2 != pid

    assert requests.delete(f"{server}/api/kernels/{kernel_id}", headers=_auth(), timeout=60).status_code == 204
    assert wait_for(lambda: not kernel_processes(host, kernel_id), 1.0)


def test_rest_refuses_a_hostile_kernel_id(lab, server):
    evil = "k; touch /tmp/sg-pwned-rest"
    r = requests.post(
        f"{server}/api/kernels", json={"name": "ssh_python", "kernel_id": evil}, headers=_auth(), timeout=60
    )
    assert r.status_code == 400
    assert "is not a valid id" in r.json()["message"]
    assert not Path("/tmp/sg-pwned-rest").exists()
    assert all("sg-pwned" not in cmd for h in lab.hosts for _, cmd in h.processes())
