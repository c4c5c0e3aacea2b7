"""The gateway holds under abuse (issue 12): idle connections and garbage sent to the callback server and to a
kernel's control listener, with real sockets, against a ResponseServer on loopback and against a real gateway
launching real kernels on the lab."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from spark_gateway import tunnel
from spark_gateway.callback import ResponseServer, generate_key_pair
from spark_gateway.control import control_request
from spark_gateway.gateway import Gateway
from tests.conftest import env, execute, kernel_processes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel-launchers" / "shared" / "scripts"))
import sg_callback  # noqa: E402
import sg_ports  # noqa: E402

pytestmark = pytest.mark.asyncio
GARBAGE = [
    b"\x00\xffnot json{",
    json.dumps({"v": 1, "kernel_id": "nobody\nFORGED log line", "key": "QUFB", "nonce": "QUFB", "data": "",
                "tag": ""}).encode(),
    json.dumps({"v": 1, "kernel_id": "x" * 100, "key": "A" * 344, "nonce": "A" * 16, "data": "A" * 40000,
                "tag": "A" * 24}).encode(),
]  # fmt: skip


@contextlib.asynccontextmanager
async def idle_connections(
    address: tuple[str, int], sources: list[str], per_source: int
) -> AsyncIterator[list[socket.socket]]:
    """Connections that never send a byte, `per_source` from each source address (opened from a thread, so the
    server on this event loop accepts them meanwhile)."""
    socks: list[socket.socket] = []

    def connect() -> None:
        for source in sources:
            for _ in range(per_source):
                socks.append(socket.create_connection(address, timeout=10, source_address=(source, 0)))

    try:
        await asyncio.to_thread(connect)
        await asyncio.sleep(0.2)  # let the server's accept callbacks run (evictions happen there)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def still_open(socks: list[socket.socket]) -> list[socket.socket]:
    """The connections the server has not closed (a peek that would block: nothing arrived, no EOF)."""
    alive = []
    for sock in socks:
        sock.setblocking(False)
        try:
            if sock.recv(1, socket.MSG_PEEK):
                continue  # a reply: the server is done with it
        except BlockingIOError:
            alive.append(sock)
        except OSError:
            pass  # reset by the server
    return alive


def fields(kernel_id: str) -> dict:
    return {
        "connection_info": sg_ports.build_connection_info([10001, 10002, 10003, 10004, 10005], "127.0.0.1"),
        "pid": 4242, "pgid": 4242, "hostname": "h", "listener_port": 10006, "listener_secret": "00" * 32,
        "connection_file": f"/tmp/sg-kernel-{kernel_id}.json", "log_file": None,
    }  # fmt: skip


async def test_silent_connections_from_many_peers_cannot_keep_a_callback_out() -> None:
    """200 silent connections from 20 loopback peers: at most the caps stay open, and a callback still gets in."""
    srv = ResponseServer(generate_key_pair(), max_connections=40, max_per_peer=8, first_bytes_timeout=30)
    port = await srv.listen("127.0.0.1", 0)
    try:
        sources = [f"127.0.0.{i}" for i in range(2, 22)]
        async with idle_connections(("127.0.0.1", port), sources, 10) as socks:
            future = srv.register("k1", "t" * 64)
            args = (f"127.0.0.1:{port}", srv.public_key_b64, "k1", "t" * 64, fields("k1"))
            await asyncio.to_thread(sg_callback.send_connection_info, *args)
            assert (await asyncio.wait_for(future, 5))["pid"] == 4242
            alive = still_open(socks)
            assert len(alive) <= 40
            per_peer = {src: sum(s.getsockname()[0] == src for s in alive) for src in sources}
            assert max(per_peer.values()) <= 8, per_peer
    finally:
        await srv.close()


async def test_garbage_is_refused_without_rsa_work_and_without_an_oracle(caplog: pytest.LogCaptureFixture) -> None:
    srv = ResponseServer(generate_key_pair())
    port = await srv.listen("127.0.0.1", 0)
    srv.register("pending", "t" * 64)
    try:
        with caplog.at_level(logging.INFO, logger="spark_gateway.callback"):
            for data in GARBAGE:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(data)
                writer.write_eof()
                assert json.loads(await asyncio.wait_for(reader.readline(), 5)) == {"ok": False, "error": "refused"}
                writer.close()
        messages = [r.getMessage() for r in caplog.records]
        assert not any("\nFORGED" in m for m in messages), messages  # ids are logged with %r
        assert any("'nobody\\nFORGED log line' is not registered" in m for m in messages), messages
        assert not any("unwrap" in m or "authentication" in m for m in messages), messages  # no RSA was tried
    finally:
        await srv.close()


async def test_a_real_launch_succeeds_under_an_idle_flood_and_garbage(lab, managers) -> None:
    """400 silent connections to the gateway's callback port and a stream of garbage from another host: a kernel
    still starts and runs, and the gateway keeps no more silent connections than its per-peer cap."""
    first = managers()
    await first.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[0].name))
    gateway = await Gateway.instance().loop_state()
    port = gateway.ports[lab.gateway_address]
    sender = (
        "import json, socket, sys\n"
        f"for data in {GARBAGE!r} * 60:\n"
        f"    with socket.create_connection(({lab.gateway_address!r}, {port}), timeout=10) as s:\n"
        "        s.sendall(data); s.shutdown(socket.SHUT_WR); s.recv(100)\n"
    )
    async with idle_connections((lab.gateway_address, port), [lab.gateway_address], 400) as socks:
        garbage = asyncio.ensure_future(asyncio.to_thread(lab.hosts[1].run, [sys.executable, "-c", sender]))
        second = managers()
        await second.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[0].name))
        out, reply = await execute(second, "print(6 * 7)")
        assert reply["status"] == "ok" and out.strip() == "42"
        assert len(still_open(socks)) <= gateway.server.max_per_peer
        assert (await garbage).returncode == 0


async def test_idle_connections_to_a_kernels_listener_do_not_stop_interrupt_and_shutdown(lab, managers, caplog):
    """60 silent connections held to a kernel's control listener (from the gateway's own address, too): the
    gateway's authenticated requests still get through the listener, never replaced by a signal over SSH."""
    host = lab.hosts[2]
    km = managers()
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    ip, port, secret = km.provisioner.listener
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        with caplog.at_level(logging.DEBUG):
            async with idle_connections((ip, port), [lab.gateway_address], 60) as socks:
                assert (await control_request(ip, port, secret, "poll"))["alive"] is True
                msg_id = kc.execute("import time; time.sleep(60)")
                await asyncio.sleep(0.5)
                await km.interrupt_kernel()
                reply = await kc.get_shell_msg(timeout=20)
                assert (reply["parent_header"]["msg_id"], reply["content"]["ename"]) == (msg_id, "KeyboardInterrupt")
                assert len(still_open(socks)) < 60  # silent ones were evicted for the gateway's requests
                await km.shutdown_kernel()
        assert not [r for r in caplog.records if "over SSH" in r.getMessage()], caplog.text
    finally:
        kc.stop_channels()
    assert kernel_processes(host, km.kernel_id) == []


async def test_connections_to_a_tunnelled_callback_port_create_bounded_threads(lab, managers):
    """Anyone on a host can connect to the callback's remote forward: each spliced connection costs the gateway
    two threads, so only `tunnel.MAX_SPLICES` are spliced at once; a tunnelled kernel still starts meanwhile."""
    host = lab.hosts[1]
    first = managers(enable_tunneling=True)
    await first.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    transport = (await asyncio.to_thread(first.provisioner.cluster.pool.client, host.name)).get_transport()
    remote_port = next(iter(Gateway.instance().callback_forwards._routes[transport]))
    holder = (
        "import socket, time\n"
        f"socks = [socket.create_connection(('127.0.0.1', {remote_port}), timeout=10) for _ in range(150)]\n"
        "time.sleep(4)\n"
    )
    before = sum(t.name == "sg-tunnel" for t in threading.enumerate())
    held = asyncio.ensure_future(asyncio.to_thread(host.run, [sys.executable, "-c", holder]))
    most = 0
    while not held.done():
        most = max(most, sum(t.name == "sg-tunnel" for t in threading.enumerate()) - before)
        await asyncio.sleep(0.05)
    assert (await held).returncode == 0
    assert 0 < most <= 2 * tunnel.MAX_SPLICES, most
    second = managers(enable_tunneling=True)
    await second.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    out, reply = await execute(second, "print(6 * 7)")
    assert out.strip() == "42"
