"""A real `jupyter server` whose kernelspecs are the tests' ssh specs, and its REST + websocket API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from tornado.websocket import websocket_connect

from testlab.gateway import env
from testlab.hostlab import HostLab

TOKEN = uuid.uuid4().hex
AUTH = {"Authorization": f"token {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def jupyter_server(lab: HostLab, root: Path, specs: list[Path]) -> Iterator[str]:
    """Run `jupyter server` in `root` with `specs` (kernelspec dirs) and the lab's hosts; yields its base URL."""
    (root / "jp" / "kernels").mkdir(parents=True)
    for spec in specs:
        (root / "jp" / "kernels" / spec.name).symlink_to(spec)
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
                if requests.get(f"{base}/api/status", headers=AUTH, timeout=2).ok:
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


async def run_code(base: str, kernel_id: str, code: str) -> str:
    """Execute `code` over the kernel's websocket, as a notebook does; returns its stream output."""
    url = base.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?token={TOKEN}"
    ws = await websocket_connect(url)
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "username": "t", "session": uuid.uuid4().hex,
              "version": "5.3", "date": ""}  # fmt: skip
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False,
               "stop_on_error": True}  # fmt: skip
    ws.write_message(json.dumps({"header": header, "parent_header": {}, "metadata": {}, "channel": "shell",
                                 "buffers": [], "content": content}))  # fmt: skip
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
