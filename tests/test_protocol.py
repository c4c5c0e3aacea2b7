"""Callback and control protocols over real sockets on 127.0.0.1 (docs/design.md)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from spark_gateway import control
from spark_gateway.callback import PayloadError, ResponseServer, decrypt_payload, generate_key_pair
from spark_gateway.control import ControlChannel, ControlError, ControlRefused, control_request
from spark_gateway.protocol import MAX_MESSAGE, request_mac
from tests.conftest import wait_for

SCRIPTS = Path(__file__).resolve().parents[1] / "kernel-launchers" / "shared" / "scripts"
sys.path.insert(0, str(SCRIPTS))
import sg_callback  # noqa: E402
import sg_control  # noqa: E402
import sg_ports  # noqa: E402
import sg_procinfo  # noqa: E402
import sg_reports  # noqa: E402

LOCAL = "127.0.0.1"


@pytest.fixture(scope="module")
def private_key() -> Any:
    return generate_key_pair()


@pytest_asyncio.fixture
async def server(private_key: Any) -> AsyncIterator[tuple[ResponseServer, int]]:
    srv = ResponseServer(private_key, read_timeout=1.0)
    port = await srv.listen(LOCAL, 0)
    yield srv, port
    await srv.close()


def fields(kernel_id: str) -> dict[str, Any]:
    """Plausible callback fields (everything but kernel_id and launch_token)."""
    return {
        "connection_info": sg_ports.build_connection_info([10001, 10002, 10003, 10004, 10005], LOCAL),
        "pid": 4242,
        "pgid": 4242,
        "hostname": "host-a",
        "listener_port": 10006,
        "listener_secret": secrets.token_hex(32),
        "connection_file": f"/tmp/kernel-{kernel_id}.json",
        "log_file": None,
    }


def sealed(srv: ResponseServer, kernel_id: str, token: str) -> tuple[bytes, dict[str, Any]]:
    plaintext = {"kernel_id": kernel_id, "launch_token": token, **fields(kernel_id)}
    return sg_callback.encrypt_payload(srv.public_key_b64, kernel_id, plaintext), plaintext


def tamper(raw: bytes, field: str, value: Any = None) -> bytes:
    """Flip the last byte of a base64 field, or set ``field`` to ``value``."""
    envelope = json.loads(raw)
    if value is None:
        data = bytearray(base64.b64decode(envelope[field]))
        data[-1] ^= 0x01
        value = base64.b64encode(bytes(data)).decode()
    envelope[field] = value
    return json.dumps(envelope).encode()


async def send_raw(port: int, data: bytes) -> dict[str, Any] | None:
    """Send ``data`` as one callback; the reply, or None if the server reset the connection."""
    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        line = await asyncio.wait_for(reader.readline(), 5)
        return json.loads(line)
    except ConnectionResetError:
        return None
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_round_trip_resolves_future(server: tuple[ResponseServer, int]) -> None:
    srv, port = server
    token = secrets.token_hex(32)
    future = srv.register("k1", token)
    payload = fields("k1")
    await asyncio.to_thread(
        sg_callback.send_connection_info, f"{LOCAL}:{port}", srv.public_key_b64, "k1", token, payload
    )
    assert future.done()
    assert await future == {"kernel_id": "k1", "launch_token": token, **payload}


Case = Callable[[ResponseServer, str], bytes]
BAD_CASES: dict[str, tuple[Case, str]] = {
    "garbage": (lambda srv, token: b"\x00\xffnot json{", "not JSON"),
    "oversize": (lambda srv, token: b" " * (MAX_MESSAGE + 1), "larger than"),
    "ciphertext": (lambda srv, token: tamper(sealed(srv, "kb", token)[0], "data"), "authentication failed"),
    "tag": (lambda srv, token: tamper(sealed(srv, "kb", token)[0], "tag"), "authentication failed"),
    "wrapped key": (lambda srv, token: tamper(sealed(srv, "kb", token)[0], "key"), "cannot unwrap"),
    "swapped kernel id": (
        lambda srv, token: tamper(sealed(srv, "kb", token)[0], "kernel_id", "kgood"),
        "authentication failed",
    ),
    "wrong token": (lambda srv, token: sealed(srv, "kb", secrets.token_hex(32))[0], "wrong launch token"),
    "unregistered": (lambda srv, token: sealed(srv, "nobody", token)[0], "not registered"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", [*BAD_CASES, "replay"])
async def test_bad_payload_rejected_and_server_keeps_serving(
    server: tuple[ResponseServer, int], case: str, caplog: pytest.LogCaptureFixture
) -> None:
    srv, port = server
    token, good_token = secrets.token_hex(32), secrets.token_hex(32)
    bad_future = srv.register("kb", token)
    good_future = srv.register("kgood", good_token)
    if case == "replay":
        data, _ = sealed(srv, "kb", token)
        assert await send_raw(port, data) == {"ok": True}
        assert bad_future.done()
        reason = "replay"
    else:
        make, reason = BAD_CASES[case]
        data = make(srv, token)

    with caplog.at_level(logging.WARNING, logger="spark_gateway.callback"):
        reply = await send_raw(port, data)
    if reply is not None or case != "oversize":  # an oversize sender may see a reset instead of the reply
        assert reply == {"ok": False, "error": "refused"}  # the reason is the gateway log's, not an oracle's
    assert any(reason in r.getMessage() and LOCAL in r.getMessage() for r in caplog.records), caplog.text
    assert not good_future.done()
    assert (case == "replay") == bad_future.done()

    data, plaintext = sealed(srv, "kgood", good_token)
    assert await send_raw(port, data) == {"ok": True}
    assert await asyncio.wait_for(good_future, 1) == plaintext


@pytest.mark.asyncio
async def test_silent_client_does_not_block_others(server: tuple[ResponseServer, int]) -> None:
    srv, port = server
    token = secrets.token_hex(32)
    future = srv.register("k1", token)
    silent_reader, silent_writer = await asyncio.open_connection(LOCAL, port)
    started = time.monotonic()
    assert await send_raw(port, sealed(srv, "k1", token)[0]) == {"ok": True}
    assert future.done() and time.monotonic() - started < 0.5  # read_timeout is 1 s
    reply = json.loads(await asyncio.wait_for(silent_reader.readline(), 3))
    assert reply == {"ok": False, "error": "refused"}
    silent_writer.close()


@pytest.mark.asyncio
async def test_unregister_cancels_and_rejects(server: tuple[ResponseServer, int]) -> None:
    srv, port = server
    token = secrets.token_hex(32)
    future = srv.register("k1", token)
    srv.unregister("k1")
    assert future.cancelled()
    reply = await send_raw(port, sealed(srv, "k1", token)[0])
    assert reply == {"ok": False, "error": "refused"}


@pytest.mark.asyncio
async def test_listen_skips_port_in_use(private_key: Any) -> None:
    blocker = ResponseServer(private_key)
    srv = ResponseServer(private_key)
    try:
        taken = await blocker.listen(LOCAL, 0)
        bound = await srv.listen(LOCAL, taken, port_retries=10)
        assert taken < bound <= taken + 10
    finally:
        await blocker.close()
        await srv.close()


def test_decrypt_with_other_key_fails(private_key: Any) -> None:
    other = ResponseServer(generate_key_pair())
    data, _ = sealed(other, "k1", "t")
    with pytest.raises(PayloadError, match="cannot unwrap"):
        decrypt_payload(private_key, data)
    assert decrypt_payload(other.private_key, data)[0] == "k1"


@pytest.mark.parametrize("bits", [2048, 3072])
def test_the_launcher_s_own_rsa_oaep_is_what_pycryptodome_decrypts(bits: int) -> None:
    """sg_callback wraps the AES key without importing pycryptodome's RSA: the gateway's standard decrypt must open
    it, for any key size and every random seed; what is not an RSA key, or too long a message, is refused."""
    from Crypto.Cipher import PKCS1_OAEP
    from Crypto.Hash import SHA256
    from Crypto.PublicKey import ECC, RSA

    key = RSA.generate(bits)
    spki = key.publickey().export_key(format="DER")
    assert sg_callback.rsa_public_numbers(spki) == (key.n, key.e)
    unwrap = PKCS1_OAEP.new(key, hashAlgo=SHA256)
    for message in (secrets.token_bytes(32) for _ in range(20)):
        wrapped = sg_callback.oaep_encrypt(spki, message)
        assert len(wrapped) == bits // 8 and unwrap.decrypt(wrapped) == message
    assert sg_callback.oaep_encrypt(spki, b"k") != sg_callback.oaep_encrypt(spki, b"k")  # a fresh seed each time
    longest = bits // 8 - 66
    assert unwrap.decrypt(sg_callback.oaep_encrypt(spki, bytes(longest))) == bytes(longest)
    with pytest.raises(ValueError, match="too long"):
        sg_callback.oaep_encrypt(spki, bytes(longest + 1))
    with pytest.raises(ValueError, match="not an RSA key"):
        sg_callback.oaep_encrypt(ECC.generate(curve="P-256").public_key().export_key(format="DER"), b"k")
    for truncated in (spki[:100], spki[:1], b""):
        with pytest.raises(ValueError, match="DER"):
            sg_callback.oaep_encrypt(truncated, b"k")


def test_sender_reports_refusal() -> None:
    srv = ResponseServer(generate_key_pair())
    with pytest.raises(sg_callback.CallbackError, match="refused"):
        sg_callback.send_connection_info(f"{LOCAL}:1", srv.public_key_b64, "k1", "t", fields("k1"), attempts=2)


# --- control listener, standalone in a subprocess --------------------------------------------------


class Standalone:
    """A `sleep` child watched by a standalone server_listener.py, and the callback it sent."""

    def __init__(self, target: subprocess.Popen[bytes], listener: subprocess.Popen[bytes], log: Path) -> None:
        self.target, self.listener, self.log = target, listener, log
        self.info: dict[str, Any] = {}

    async def request(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return await control_request(LOCAL, self.info["listener_port"], self.info["listener_secret"], op, args)

    def logged(self, text: str) -> bool:
        return text in self.log.read_text()


@contextlib.asynccontextmanager
async def start_standalone(
    server: tuple[ResponseServer, int], tmp_path: Path, target_argv: list[str], *extra: str
) -> AsyncIterator[Standalone]:
    """server_listener.py --pid <target_argv's process> (plus `extra` options), after its callback."""
    srv, port = server
    token = secrets.token_hex(32)
    future = srv.register("ks", token)
    target = subprocess.Popen(target_argv, start_new_session=True)
    log = tmp_path / "listener.log"
    argv = [sys.executable, str(SCRIPTS / "server_listener.py"), "--kernel-id", "ks"]
    argv += ["--response-address", f"{LOCAL}:{port}", "--public-key", srv.public_key_b64, "--ip", LOCAL]
    argv += ["--port-range", "0..0", "--connection-file", str(tmp_path / "kernel-ks.json"), "--pid", str(target.pid)]
    with log.open("wb") as out:
        listener = subprocess.Popen([*argv, *extra], stdin=subprocess.PIPE, stderr=out)
    assert listener.stdin
    listener.stdin.write(f"{token}\n".encode())  # where the launch shell's here-document puts it
    listener.stdin.close()
    proc = Standalone(target, listener, log)
    try:
        proc.info = await asyncio.wait_for(future, 15)
        yield proc
    finally:
        for p in (target, listener):
            p.kill()
            p.wait()


@pytest_asyncio.fixture
async def standalone(server: tuple[ResponseServer, int], tmp_path: Path) -> AsyncIterator[Standalone]:
    async with start_standalone(server, tmp_path, ["sleep", "60"]) as proc:
        yield proc


@pytest.mark.asyncio
async def test_standalone_reports_and_answers_poll(standalone: Standalone, tmp_path: Path) -> None:
    info = standalone.info
    assert (info["pid"], info["pgid"]) == (standalone.target.pid, standalone.target.pid)
    connection_file = Path(info["connection_file"])
    assert connection_file == tmp_path / "kernel-ks.json"
    assert connection_file.stat().st_mode & 0o777 == 0o600
    assert json.loads(connection_file.read_text()) == info["connection_info"]
    assert await standalone.request("poll") == {"ok": True, "alive": True}


@pytest.mark.asyncio
async def test_signal_op_delivers_signal_and_listener_follows_exit(standalone: Standalone) -> None:
    assert await standalone.request("signal", {"signum": int(signal.SIGTERM), "group": False}) == {"ok": True}
    assert await asyncio.to_thread(standalone.target.wait, 5) == -signal.SIGTERM
    assert await asyncio.to_thread(standalone.listener.wait, 5) == 0
    assert not Path(standalone.info["connection_file"]).exists()


# A process that names a thread "dag-scheduler-event-loop" (as a SparkContext does) on SIGUSR1 and records SIGUSR2.
NAMED_THREAD_ON_USR1 = """
import ctypes, signal, sys, threading, time
def named():
    ctypes.CDLL(None).prctl(15, b"dag-scheduler-event-loop", 0, 0, 0)  # PR_SET_NAME: the kernel keeps 15 bytes
    time.sleep(120)
signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=named, daemon=True).start())
signal.signal(signal.SIGUSR2, lambda *_: open(sys.argv[1], "a").write("USR2\\n"))
time.sleep(120)
"""


@pytest.mark.asyncio
async def test_guarded_interrupt_is_refused_with_the_reason_until_the_thread_runs(
    server: tuple[ResponseServer, int], tmp_path: Path
) -> None:
    received = tmp_path / "signals"
    target = [sys.executable, "-c", NAMED_THREAD_ON_USR1, str(received)]
    guard = ["--interrupt-signal", "USR2", "--interrupt-needs-thread", "dag-scheduler-event-loop"]
    guard += ["--interrupt-refusal", "no SparkContext yet"]
    async with start_standalone(server, tmp_path, target, *guard) as proc:
        interrupt = {"signum": int(signal.SIGINT), "group": False}
        with pytest.raises(ControlRefused, match="^no SparkContext yet$"):
            await proc.request("signal", interrupt)
        assert wait_for(lambda: proc.logged("interrupt of pid") and proc.logged("refused: no SparkContext yet"), 5)
        assert not received.exists() and proc.target.poll() is None  # nothing was sent

        os.kill(proc.target.pid, signal.SIGUSR1)
        assert wait_for(lambda: "dag-scheduler-e" in sg_procinfo.thread_names(proc.target.pid), 5)
        assert await proc.request("signal", interrupt) == {"ok": True}
        assert wait_for(lambda: received.exists() and received.read_text() == "USR2\n", 5)  # relayed as USR2
        # only interrupts are guarded
        assert await proc.request("signal", {"signum": int(signal.SIGTERM), "group": False}) == {"ok": True}
        assert await asyncio.to_thread(proc.target.wait, 5) == -signal.SIGTERM


async def raw_exchange(port: int, make_line: Callable[[str], bytes]) -> tuple[str, bytes]:
    """Read the challenge, send make_line(challenge); return (challenge, whatever comes back before EOF)."""
    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        challenge = json.loads(await reader.readline())["challenge"]
        writer.write(make_line(challenge))
        await writer.drain()
        return challenge, await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_unauthenticated_requests_are_logged_and_ignored(standalone: Standalone) -> None:
    port, secret = standalone.info["listener_port"], bytes.fromhex(standalone.info["listener_secret"])
    kill = {"signum": int(signal.SIGKILL), "group": True}

    def signed(challenge: str, op: str = "signal", key: bytes = secret) -> bytes:
        return json.dumps({"op": op, "args": kill, "mac": request_mac(key, challenge, op, kill)}).encode() + b"\n"

    silent = await asyncio.open_connection(LOCAL, port)  # says nothing: must not hold up the others
    started = time.monotonic()
    _, answer = await raw_exchange(port, lambda c: signed(c, key=secrets.token_bytes(32)))
    assert answer == b""
    # a request signed for an earlier challenge (a captured request) is replayed on a new connection
    old_challenge, _ = await raw_exchange(port, lambda c: b"\n")
    _, answer = await raw_exchange(port, lambda c: signed(old_challenge))
    assert answer == b""
    _, answer = await raw_exchange(port, lambda c: signed(c, op="reboot"))
    assert answer == b""
    _, answer = await raw_exchange(port, lambda c: b"{not json\n")
    assert answer == b""

    assert await standalone.request("poll") == {"ok": True, "alive": True}
    assert time.monotonic() - started < 2.5  # the listener's per-connection timeout is 5 s
    assert standalone.target.poll() is None
    assert wait_for(lambda: standalone.log.read_text().count("bad MAC") == 2, 5), standalone.log.read_text()
    assert standalone.logged("unknown op 'reboot'") and standalone.logged("bad JSON")
    silent[1].close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """`condition` became true within `timeout` seconds, the event loop running meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return condition()


@pytest.mark.asyncio
async def test_a_kept_connection_takes_requests_each_signed_for_a_fresh_challenge(standalone: Standalone) -> None:
    port, secret = standalone.info["listener_port"], bytes.fromhex(standalone.info["listener_secret"])

    def poll(challenge: str) -> bytes:
        mac = request_mac(secret, challenge, "poll", {})
        return json.dumps({"op": "poll", "args": {}, "mac": mac}).encode() + b"\n"

    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        challenges = [json.loads(await reader.readline())["challenge"]]
        for _ in range(3):
            writer.write(poll(challenges[-1]))
            reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
            assert reply["ok"] is True and reply["alive"] is True
            challenges.append(reply["challenge"])
        assert len(set(challenges)) == 4
        writer.write(poll(challenges[-2]))  # a request replayed on the same connection: answered by its end
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert wait_for(lambda: standalone.logged("bad MAC for op 'poll'"), 5)


@pytest.mark.asyncio
async def test_a_control_channel_keeps_one_connection_and_stops_vouching_when_its_listener_ends(
    standalone: Standalone,
) -> None:
    channel = ControlChannel(LOCAL, standalone.info["listener_port"], standalone.info["listener_secret"])
    assert await channel.request("poll") == {"ok": True, "alive": True}  # the challenge is the channel's own
    kept = channel._connection
    assert kept is not None and channel.vouches(60.0)
    for _ in range(3):
        await channel.request("poll")
    assert channel._connection is kept
    standalone.target.kill()  # the listener exits with its kernel, closing the kept connection
    await asyncio.to_thread(standalone.listener.wait, 10)
    assert await until(lambda: not channel.vouches(60.0))
    with pytest.raises(ControlError, match="op 'poll'"):
        await channel.request("poll", timeout=2)
    channel.close()


@pytest.mark.asyncio
async def test_only_max_kept_connections_stay_open_and_one_shot_clients_still_work() -> None:
    listener = sg_control.ControlListener(os.getpid(), os.getpgid(0), ip=LOCAL, max_kept=1)
    listener.start()
    try:
        first, second = (ControlChannel(LOCAL, listener.port, listener.secret_hex) for _ in range(2))
        await first.request("poll")
        await second.request("poll")
        assert first._connection is not None and second._connection is None  # no place left: closed after
        first.close()
        assert await until(lambda: listener._kept == 0)
        await second.request("poll")
        assert second._connection is not None  # the place was given back
        assert await control_request(LOCAL, listener.port, listener.secret_hex, "poll") == {"ok": True, "alive": True}
        second.close()
    finally:
        listener.stop()


@pytest.mark.asyncio
async def test_ready_waits_for_the_kernel_s_sockets() -> None:
    bound = threading.Event()
    listener = sg_control.ControlListener(os.getpid(), os.getpgid(0), ip=LOCAL, ready=bound.wait)
    listener.start()
    try:
        ask = functools.partial(control_request, LOCAL, listener.port, listener.secret_hex, "ready")
        assert await ask({"wait": 0}) == {"ok": True, "ready": False}
        asyncio.get_running_loop().call_later(0.3, bound.set)
        assert await ask({"wait": 4}) == {"ok": True, "ready": True}  # answered once bound, within the wait
        with pytest.raises(ControlError, match="wait is 0..4"):
            await ask({"wait": 60})
    finally:
        listener.stop()
    standalone = sg_control.ControlListener(os.getpid(), os.getpgid(0), ip=LOCAL)  # e.g. R's: bound before callback
    standalone.start()
    try:
        reply = await control_request(LOCAL, standalone.port, standalone.secret_hex, "ready")
        assert reply == {"ok": True, "ready": True}
    finally:
        standalone.stop()


@pytest.mark.asyncio
async def test_control_request_errors_name_the_listener(standalone: Standalone) -> None:
    port = standalone.info["listener_port"]
    with pytest.raises(ControlError, match=f"{LOCAL}:{port}.*closed"):
        await control_request(LOCAL, port, secrets.token_hex(32), "poll")
    with pytest.raises(ControlError, match="bad signal args"):
        await standalone.request("signal", {"signum": "TERM"})
    with pytest.raises(ControlError, match=f"{LOCAL}:1"):
        await control_request(LOCAL, 1, secrets.token_hex(32), "poll", timeout=1)


def test_listener_thread_survives_garbage_in_process() -> None:
    """In-process: a client that vanishes mid-request does not kill the serving thread."""
    listener = sg_control.ControlListener(os.getpid(), os.getpgid(0), ip=LOCAL, timeout=0.5)
    listener.start()
    try:
        with socket.create_connection((LOCAL, listener.port)) as sock:
            sock.recv(100)
        reply = asyncio.run(control_request(LOCAL, listener.port, listener.secret_hex, "poll"))
        assert reply == {"ok": True, "alive": True}
    finally:
        listener.stop()


def test_a_process_listening_sockets_are_found_with_their_addresses() -> None:
    """What the JVM Spark report reads to find a driver's Spark UI: this process's own listening sockets."""
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6, socket.socket() as wildcard:
        v4.bind((LOCAL, 0))
        v6.bind(("::1", 0))
        wildcard.bind(("0.0.0.0", 0))
        for s in (v4, v6, wildcard):
            s.listen()
        ours = {(LOCAL, v4.getsockname()[1]), ("::1", v6.getsockname()[1]), (LOCAL, wildcard.getsockname()[1])}
        assert ours <= set(sg_procinfo.process_listening(os.getpid()))
        assert not ours & set(sg_procinfo.process_listening(os.getppid()))  # another process's sockets are not ours
    assert not ours & set(sg_procinfo.process_listening(os.getpid()))  # closed: gone


def test_proc_addresses_are_decoded() -> None:
    little = sys.byteorder == "little"
    assert sg_procinfo._proc_address("0100007F" if little else "7F000001") == "127.0.0.1"
    assert sg_procinfo._proc_address("0B00FA0A" if little else "0AFA000B") == "10.250.0.11"
    assert sg_procinfo._proc_address("00000000") == "127.0.0.1"  # wildcard: reached over loopback
    assert sg_procinfo._proc_address("0" * 32) == "127.0.0.1"
    mapped = "0000000000000000FFFF00000B00FA0A" if little else "00000000000000000000FFFF0AFA000B"
    assert sg_procinfo._proc_address(mapped) == "10.250.0.11"


def catches(pid: int, signum: int) -> bool:
    """Whether `pid` has a handler for `signum` (/proc/PID/status SigCgt)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(status.split("SigCgt:")[1].split()[0], 16) >> (signum - 1) & 1)


def test_jvm_spark_report_without_a_spark_ui_turns_ready_after_its_grace(tmp_path: Path) -> None:
    """A context found by its thread, but no port answering as a Spark UI (spark.ui.enabled=false): `ready`, with
    the details unknown, once the grace has passed. (With a UI: tests/test_scala_kernel.py, against real Spark.)"""
    proc = subprocess.Popen([sys.executable, "-c", NAMED_THREAD_ON_USR1, str(tmp_path / "signals")])
    try:
        report = sg_reports.JvmSparkReport(proc.pid, kernel_ports=[])
        report.UI_GRACE = 0.5
        assert report.read() == {"spark": {"state": "starting", "error": None}}
        assert wait_for(lambda: catches(proc.pid, signal.SIGUSR1), 10)  # its handler is installed
        proc.send_signal(signal.SIGUSR1)
        assert wait_for(lambda: "dag-scheduler-e" in sg_procinfo.thread_names(proc.pid), 10)
        assert report(wait=0)["spark"]["state"] == "starting"  # its UI may still be coming
        assert report(wait=3)["spark"] == {"state": "ready", "error": None, "app_id": None, "app_name": None,
                                           "master": None, "ui_url": None, "spark_version": None}  # fmt: skip
    finally:
        proc.kill()
        proc.wait()


# The Python launcher's own listener, in its process. SIGINT is blocked everywhere, so it stays pending, and the kernel
# shows where: SigPnd of the main thread (sent to that thread) or ShdPnd (sent to the process: any thread may take it).
IN_PROCESS_INTERRUPT = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import sg_control
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # threads started from here on block it too
listener = sg_control.ControlListener(os.getpid(), os.getpgid(0), ip="127.0.0.1")
listener.start()
print(json.dumps({"port": listener.port, "secret": listener.secret_hex}), flush=True)
sys.stdin.readline()
status = open(f"/proc/self/task/{os.getpid()}/status").read().splitlines()
print(json.dumps({k: int(v, 16) for k, v in (line.split(":") for line in status) if k in ("SigPnd", "ShdPnd")}))
"""


def test_an_in_process_interrupt_goes_to_the_thread_that_runs_the_cells() -> None:
    """A SIGINT to the process may land on any thread; one blocked in a call (py4j waiting for a Spark job) would
    then not be interrupted. The in-process listener sends it to the main thread itself."""
    argv = [sys.executable, "-c", IN_PROCESS_INTERRUPT, str(SCRIPTS)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        listener = json.loads(proc.stdout.readline())
        interrupt = {"signum": int(signal.SIGINT), "group": False}
        assert asyncio.run(control_request(LOCAL, listener["port"], listener["secret"], "signal", interrupt))["ok"]
        proc.stdin.write("pending?\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"SigPnd": 1 << (signal.SIGINT - 1), "ShdPnd": 0}
    finally:
        proc.kill()
        proc.wait()


def test_a_kept_connection_vouches_no_longer_than_the_grace_and_the_orphan_timeout_allow() -> None:
    """The lease: POLL_LEASE at most, never longer than unreachable_grace, a third of orphan_timeout (0 = none)."""
    assert control.poll_lease(unreachable_grace=60.0, orphan_timeout=0.0) == control.POLL_LEASE
    assert control.poll_lease(unreachable_grace=10.0, orphan_timeout=0.0) == 10.0
    assert control.poll_lease(unreachable_grace=60.0, orphan_timeout=1800.0) == control.POLL_LEASE
    assert control.poll_lease(unreachable_grace=60.0, orphan_timeout=45.0) == 15.0
    assert control.poll_lease(unreachable_grace=5.0, orphan_timeout=45.0) == 5.0
