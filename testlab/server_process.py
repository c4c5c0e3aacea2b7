"""A `jupyter server` with DistributedMappingKernelManager that a test can SIGKILL and start again on its data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from testlab.gateway import env
from testlab.hostlab import HostLab
from testlab.jupyter_rest import AUTH, TOKEN, _free_port

MANAGER = "spark_gateway.server.DistributedMappingKernelManager"
START_BOUND = 180.0  # seconds for `jupyter server` to answer: its imports alone took 40+ s at load 16 on 2 cores


class ServerProcess:
    """`jupyter server` on the lab's hosts; kernelspecs, Jupyter data dir (session store) and logs in `root`."""

    def __init__(self, lab: HostLab, root: Path, specs: list[Path], *args: str, **environ: str) -> None:
        self.lab, self.root, self.args, self.environ = lab, root, list(args), environ
        (root / "jp" / "kernels").mkdir(parents=True, exist_ok=True)
        for spec in specs:
            link = root / "jp" / "kernels" / spec.name
            if not link.exists():
                link.symlink_to(spec)
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.starts = 0

    @property
    def store(self) -> Path:
        return self.root / "data" / "spark_gateway" / "sessions"

    def log_text(self) -> str:
        return "".join(p.read_text() for p in sorted(self.root.glob("server-*.log")))

    def start(self) -> str:
        port = _free_port()
        self.starts += 1
        log = (self.root / f"server-{self.starts}.log").open("w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "jupyter"), "server", "--no-browser", f"--port={port}",
             "--ip=127.0.0.1", "--allow-root", f"--IdentityProvider.token={TOKEN}",
             f"--ServerApp.root_dir={self.root}", f"--ServerApp.kernel_manager_class={MANAGER}", *self.args],
            env=env(
                JUPYTER_PATH=str(self.root / "jp"), JUPYTER_CONFIG_DIR=str(self.root / "cfg"),
                JUPYTER_DATA_DIR=str(self.root / "data"), JUPYTER_RUNTIME_DIR=str(self.root / "runtime"),
                GP_REMOTE_HOSTS=",".join(h.name for h in self.lab.hosts), GP_SSH_CONFIG_FILE=str(self.lab.ssh_config),
                **self.environ,
            ),
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        log.close()
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_BOUND
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.base}/api/status", headers=AUTH, timeout=2).ok:
                    return self.base
            except requests.ConnectionError:
                time.sleep(0.1)
        self.kill()  # not left half-started (the test's cleanup then has no server to ask)
        raise RuntimeError(f"jupyter server did not answer within {START_BOUND:g} s: {self.log_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to shut anything down or write anything."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(20)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None

    def kernels(self) -> dict[str, dict]:
        r = requests.get(f"{self.base}/api/kernels", headers=AUTH, timeout=30)
        r.raise_for_status()
        return {k["id"]: k for k in r.json()}

    def start_kernel(self, name: str = "ssh_python") -> str:
        r = requests.post(f"{self.base}/api/kernels", json={"name": name}, headers=AUTH, timeout=120)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def delete_kernel(self, kernel_id: str) -> int:
        return requests.delete(f"{self.base}/api/kernels/{kernel_id}", headers=AUTH, timeout=60).status_code
