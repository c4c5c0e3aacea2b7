"""Production operation on real SSH hosts: orphaned kernels end themselves, per-user limits hold."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from spark_gateway.control import control_request
from testlab.jupyter_rest import AUTH
from testlab.server_process import ServerProcess
from tests.conftest import env, eventually, kernel_processes, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel-launchers" / "shared" / "scripts"))
import sg_control  # noqa: E402


@pytest.mark.asyncio
async def test_an_orphaned_kernel_ends_itself_and_a_polled_one_does_not(lab, managers):
    host = lab.hosts[0]
    orphan, polled = managers(orphan_timeout=3.0), managers(orphan_timeout=3.0)
    for km in (orphan, polled):
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
        assert kernel_processes(host, km.kernel_id)

    async def poll_every_second() -> None:  # as jupyter_server's restarter polls every kernel it manages
        while True:
            assert await polled.is_alive()
            await asyncio.sleep(1.0)

    poller = asyncio.ensure_future(poll_every_second())
    try:
        # nobody polls `orphan` (its gateway "died"): it ends itself on its host after 3 s, alone
        assert await eventually(lambda: not kernel_processes(host, orphan.kernel_id), 20.0)
        await asyncio.sleep(4.0)  # more than the timeout again: the polled one is still there
        assert not poller.done()
        assert kernel_processes(host, polled.kernel_id)
        assert await polled.is_alive()
    finally:
        poller.cancel()
    assert not await orphan.is_alive()


@pytest.mark.asyncio
async def test_max_kernels_per_user_counts_what_the_hosts_run(lab, managers):
    carol = [managers(max_kernels_per_user=2) for _ in range(3)]
    await carol[0].start_kernel(env=env(KERNEL_USERNAME="carol", KERNEL_REMOTE_HOST=lab.hosts[0].name))
    await carol[1].start_kernel(env=env(KERNEL_USERNAME="carol", KERNEL_REMOTE_HOST=lab.hosts[1].name))
    with pytest.raises(Exception, match="already runs 2 kernel") as info:
        await carol[2].start_kernel(env=env(KERNEL_USERNAME="carol"))
    assert info.value.status_code == 403
    message = str(info.value)
    assert f"{carol[0].kernel_id} on {lab.hosts[0].name}" in message
    assert f"{carol[1].kernel_id} on {lab.hosts[1].name}" in message
    assert not any(kernel_processes(h, carol[2].kernel_id) for h in lab.hosts)

    dave = managers(max_kernels_per_user=2)  # another user is not held back by carol's kernels
    await dave.start_kernel(env=env(KERNEL_USERNAME="dave"))
    assert await dave.is_alive()

    await carol[0].shutdown_kernel()  # one fewer on the hosts: carol may start again
    await carol[2].start_kernel(env=env(KERNEL_USERNAME="carol"))
    assert await carol[2].is_alive()


@pytest.mark.asyncio
async def test_max_kernels_per_user_counts_a_burst_still_starting(lab, managers):
    kms = [managers(max_kernels_per_user=2) for _ in range(4)]
    outcomes = await asyncio.gather(*(km.start_kernel(env=env(KERNEL_USERNAME="erin")) for km in kms),
                                    return_exceptions=True)  # fmt: skip
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert len(refused) == 2 and all(o.status_code == 403 for o in refused), outcomes
    running = [km for km in kms if km.has_kernel]
    assert len(running) == 2 and all([await km.is_alive() for km in running])


def test_max_kernels_per_user_holds_across_gateways(lab, kernels_dir, tmp_path):
    """Two `jupyter server` processes share the hosts: the second refuses the user's kernel the first started."""
    first = ServerProcess(lab, tmp_path / "a", [kernels_dir / "ssh_python"], GP_MAX_KERNELS_PER_USER="1")
    second = ServerProcess(lab, tmp_path / "b", [kernels_dir / "ssh_python"], GP_MAX_KERNELS_PER_USER="1")
    try:
        first.start()
        second.start()
        kernel_id = first.start_kernel()
        host = next(h for h in lab.hosts if kernel_processes(h, kernel_id))
        r = requests.post(f"{second.base}/api/kernels", json={"name": "ssh_python"}, headers=AUTH, timeout=120)
        assert r.status_code == 403, r.text
        assert "user 'alice' already runs 1 kernel(s)" in r.json()["message"]
        assert f"{kernel_id} on {host.name}" in r.json()["message"]
        assert first.delete_kernel(kernel_id) == 204
        assert wait_for(lambda: not kernel_processes(host, kernel_id), 5.0)
        kernel_id = second.start_kernel()  # the hosts no longer run one for alice
        assert second.delete_kernel(kernel_id) == 204
    finally:
        first.stop()
        second.stop()


def _bad_mac_request(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.makefile("rb").readline()  # the challenge
        sock.sendall(json.dumps({"op": "poll", "args": {}, "mac": "00" * 32}).encode() + b"\n")
        sock.recv(100)  # closed without a reply


@pytest.mark.asyncio
async def test_orphan_clock_counts_only_authenticated_requests():
    """Requests with a bad MAC (anyone on the network) do not keep an orphan alive; authenticated polls do."""
    target = subprocess.Popen(["sleep", "120"], start_new_session=True)
    listener = sg_control.ControlListener(target.pid, target.pid, ip="127.0.0.1", orphan_timeout=2.0)
    listener.start()
    try:
        for _ in range(10):  # 3 s of authenticated polls: the kernel lives on
            await control_request("127.0.0.1", listener.port, listener.secret_hex, "poll")
            await asyncio.sleep(0.3)
        assert target.poll() is None
        deadline = time.monotonic() + 10
        while target.poll() is None and time.monotonic() < deadline:  # only forged requests now: it ends
            _bad_mac_request(listener.port)
            await asyncio.sleep(0.3)
        assert target.poll() is not None, "the orphan was kept alive by unauthenticated requests"
    finally:
        listener.stop()
        if target.poll() is None:
            target.kill()
        target.wait()
