"""launch_ipykernel.py as a real subprocess: callback, kernel client, interrupt, shutdown (docs/design.md)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from jupyter_client.asynchronous import AsyncKernelClient

from spark_gateway.callback import ResponseServer
from spark_gateway.control import control_request

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "kernel-launchers" / "shared" / "scripts"
sys.path.insert(0, str(SHARED))
import sg_ports  # noqa: E402
import sg_procinfo  # noqa: E402

LOCAL = "127.0.0.1"


class Launcher:
    """Runs launch_ipykernel.py the way the launch script does: own session, output to the kernel log."""

    def __init__(self, server: ResponseServer, port: int, tmp: Path) -> None:
        self.server, self.port, self.tmp = server, port, tmp
        self.scripts = tmp / "scripts"  # deployed layout: both scripts in one directory
        self.scripts.mkdir()
        for module in (SHARED / "server_listener.py", *SHARED.glob("sg_*.py")):
            shutil.copy(module, self.scripts)
        for launcher in ("launch_ipykernel.py", "sg_ipykernel.py"):
            shutil.copy(ROOT / "kernel-launchers" / "python" / "scripts" / launcher, self.scripts)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, kernel_id: str, *extra: str, token: str | None = None) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # ipykernel treats pytest specially
        env.update(GP_KERNEL_RUNTIME_DIR=str(self.tmp / "runtime"), GP_KERNEL_LOG_DIR=str(self.tmp))
        argv = [sys.executable, str(self.scripts / "launch_ipykernel.py"), "--kernel-id", kernel_id, "--ip", LOCAL]
        argv += ["--response-address", f"{LOCAL}:{self.port}", "--public-key", self.server.public_key_b64, *extra]
        with self.log(kernel_id).open("wb") as out:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        assert proc.stdin
        proc.stdin.write(f"{token}\n".encode() if token is not None else b"")  # as the launch shell hands it over
        proc.stdin.close()
        self.procs.append(proc)
        return proc

    async def launch(self, kernel_id: str, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, Any], float]:
        """Start a registered kernel; return it, its callback payload and the seconds until the callback."""
        token = secrets.token_hex(32)
        future = self.server.register(kernel_id, token)
        started = time.monotonic()
        proc = self.start(kernel_id, *extra, token=token)
        info = await asyncio.wait_for(future, 30)
        return proc, info, time.monotonic() - started

    def log(self, kernel_id: str) -> Path:
        return self.tmp / f"kernel-{kernel_id}.log"

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest_asyncio.fixture
async def launcher(tmp_path: Path) -> AsyncIterator[Launcher]:
    server = ResponseServer()
    port = await server.listen(LOCAL, 0)
    launcher = Launcher(server, port, tmp_path)
    yield launcher
    launcher.cleanup()
    await server.close()


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert proc.returncode is not None, f"pid {proc.pid} still running after {timeout} s"
    return proc.returncode


async def connect(info: dict[str, Any]) -> AsyncKernelClient:
    client = AsyncKernelClient()
    client.load_connection_info({**info["connection_info"], "ip": LOCAL})
    client.start_channels()
    await client.wait_for_ready(timeout=30)
    return client


async def evaluate(client: AsyncKernelClient, code: str) -> str:
    """Run ``code``; return the text/plain of its execute_result."""
    results: list[str] = []

    def on_output(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "execute_result":
            results.append(msg["content"]["data"]["text/plain"])

    reply = await client.execute_interactive(code, output_hook=on_output, timeout=15)
    assert reply["content"]["status"] == "ok", reply["content"]
    return results[0]


async def control(info: dict[str, Any], op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return await control_request(LOCAL, info["listener_port"], info["listener_secret"], op, args)


@pytest.mark.asyncio
async def test_kernel_round_trip_interrupt_and_prompt_shutdown(launcher: Launcher) -> None:
    proc, info, callback_s = await launcher.launch("k1")
    print(f"\nprocess start -> callback received: {callback_s:.3f} s")
    assert (info["pid"], info["pgid"]) == (proc.pid, proc.pid)
    assert info["log_file"] == str(launcher.log("k1"))
    connection_file = Path(info["connection_file"])
    assert connection_file == launcher.tmp / "runtime" / "sg-kernel-k1.json"
    assert connection_file.stat().st_mode & 0o777 == 0o600
    assert json.loads(connection_file.read_text()) == info["connection_info"]
    assert await control(info, "poll") == {"ok": True, "alive": True}

    client = await connect(info)
    try:
        code = "import os; os.getpid(), os.environ.get('GP_LAUNCH_TOKEN')"
        assert await evaluate(client, code) == f"({proc.pid}, None)"

        msg_id = client.execute("import time; time.sleep(60)")
        while True:  # execute_input is published once the cell is about to run
            msg = await client.get_iopub_msg(timeout=10)
            if msg["msg_type"] == "execute_input" and msg["parent_header"]["msg_id"] == msg_id:
                break
        interrupted = time.monotonic()
        assert await control(info, "signal", {"signum": int(signal.SIGINT), "group": False}) == {"ok": True}
        reply = await client.get_shell_msg(timeout=10)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert (reply["content"]["status"], reply["content"]["ename"]) == ("error", "KeyboardInterrupt")
        assert time.monotonic() - interrupted < 5
        assert await evaluate(client, "6 * 7") == "42"

        shutdown_id = client.shutdown()
        reply = await client.get_control_msg(timeout=10)
        replied = time.monotonic()
        assert reply["parent_header"]["msg_id"] == shutdown_id
        assert await wait_exit(proc, 5) == 0
        exit_s = time.monotonic() - replied
        print(f"shutdown reply -> process exit: {exit_s:.3f} s")  # bench/launch.py measures it; no threshold here
        assert not connection_file.exists()
    finally:
        client.stop_channels()


def process_gone(pid: int) -> bool:
    return not sg_procinfo.pid_alive(pid)


@pytest.mark.asyncio
async def test_control_shutdown_kills_process_group(launcher: Launcher) -> None:
    proc, info, _ = await launcher.launch("k2")
    client = await connect(info)
    try:
        # a child that ignores SIGTERM: only the SIGKILL one second later ends it
        code = "import subprocess; subprocess.Popen(['sh', '-c', 'trap \"\" TERM; sleep 60']).pid"
        child = int(await evaluate(client, code))
    finally:
        client.stop_channels()
    assert os.getpgid(child) == proc.pid
    assert await control(info, "shutdown") == {"ok": True}
    assert await wait_exit(proc, 3) == -signal.SIGTERM
    deadline = time.monotonic() + 3
    while not process_gone(child) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert process_gone(child)
    assert not Path(info["connection_file"]).exists()


@pytest.mark.asyncio
async def test_bad_kernel_class_exits_before_calling_back(launcher: Launcher) -> None:
    token = secrets.token_hex(32)
    payload = launcher.server.register("k3", token)
    proc = launcher.start("k3", "--kernel-class-name", "no_such_module.Kernel", token=token)
    assert await wait_exit(proc, 30) == 1
    assert "cannot import kernel class 'no_such_module.Kernel'" in launcher.log("k3").read_text()
    assert not payload.done()  # it never reported success
    assert not (launcher.tmp / "runtime" / "sg-kernel-k3.json").exists()


@pytest.mark.asyncio
async def test_eager_spark_failure_exits_before_calling_back(launcher: Launcher, monkeypatch) -> None:
    # spark-submit itself refuses the master: its own words end the launch, which never reports success
    monkeypatch.setenv("PYSPARK_SUBMIT_ARGS", "--master nowhere://x --name k4 pyspark-shell")
    token = secrets.token_hex(32)
    payload = launcher.server.register("k4", token)
    proc = launcher.start("k4", "--spark-context-initialization-mode", "eager", token=token)
    assert await wait_exit(proc, 60) == 1
    log = launcher.log("k4").read_text()
    assert "error: cannot create the SparkSession (eager mode)" in log
    assert "spark-submit said:" in log and "Master must either be yarn or start with spark" in log
    assert not payload.done()
    assert not (launcher.tmp / "runtime" / "kernel-k4.json").exists()


@pytest.mark.asyncio
async def test_missing_token_exits_2(launcher: Launcher, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONSAFEPATH", "1")  # the entry script still finds sg_ipykernel beside it
    proc = launcher.start("k5")
    assert await wait_exit(proc, 15) == 2
    assert "error: no launch token on stdin" in launcher.log("k5").read_text()


@pytest.mark.asyncio
async def test_rejected_callback_exits_with_the_generic_refusal(launcher: Launcher) -> None:
    proc = launcher.start("k6", token=secrets.token_hex(32))  # never registered: the gateway logs why, says "refused"
    assert await wait_exit(proc, 15) == 1
    assert "rejected the connection info: refused" in launcher.log("k6").read_text()


# --- server_listener helpers ----------------------------------------------------------------------


def test_select_ports_in_range_skips_busy_ports() -> None:
    lower = sg_ports.select_ports("0..0", 1, LOCAL)[0]
    with socket.socket() as busy:
        busy.bind((LOCAL, lower))
        for _ in range(5):  # random choice: the busy port must never come back
            ports = sg_ports.select_ports(f"{lower}..{lower + 1}", 1, LOCAL)
            assert ports == [lower + 1]


def test_select_ports_distinct_and_os_assigned() -> None:
    ports = sg_ports.select_ports("0..0", 6, LOCAL)
    assert len(set(ports)) == 6 and all(p > 0 for p in ports)
    with pytest.raises(OSError, match="fewer than 3 free ports"):
        sg_ports.select_ports(f"{ports[0]}..{ports[0] + 1}", 3, LOCAL)
    with pytest.raises(ValueError, match="lower..upper"):
        sg_ports.select_ports("9000-9100", 1, LOCAL)


def test_connection_file_is_private(tmp_path: Path) -> None:
    info = sg_ports.build_connection_info([1, 2, 3, 4, 5])
    assert info["ip"] == "0.0.0.0" and info["signature_scheme"] == "hmac-sha256" and info["transport"] == "tcp"
    assert len(bytes.fromhex(info["key"])) == 32
    assert info["key"] != sg_ports.build_connection_info([1, 2, 3, 4, 5])["key"]
    path = tmp_path / "kernel.json"
    path.write_text("{}")
    path.chmod(0o644)
    sg_ports.write_connection_file(str(path), info)
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == info
