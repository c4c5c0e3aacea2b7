"""Tests of the SSH host lab itself (real sshd, real namespaces, no mocks)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest

from testlab.hostlab import BRIDGE, KERNELS_DIR, HostLab, LabHost, lab_hosts

REPO = Path(__file__).resolve().parent.parent


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True, timeout=10).returncode == 0


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if text.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def _connect(lab: HostLab, name: str, timeout: float = 10.0) -> paramiko.SSHClient:
    """Connect the way the gateway does: OpenSSH client config + known_hosts + identity."""
    config = paramiko.SSHConfig.from_path(str(lab.ssh_config)).lookup(name)
    client = paramiko.SSHClient()
    client.load_host_keys(config["userknownhostsfile"])
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        config["hostname"],
        port=int(config["port"]),
        username=config["user"],
        key_filename=config["identityfile"][0],
        look_for_keys=False,
        allow_agent=False,
        timeout=timeout,
        banner_timeout=timeout,
        auth_timeout=timeout,
    )
    return client


def _ssh(lab: HostLab, name: str, command: str) -> str:
    client = _connect(lab, name)
    try:
        _, stdout, stderr = client.exec_command(command, timeout=30)
        out = stdout.read().decode()
        status = stdout.channel.recv_exit_status()
        assert status == 0, f"{command!r} on {name} exited {status}: {stderr.read().decode()}"
        return out
    finally:
        client.close()


def _start_sleeper(lab: HostLab, name: str) -> str:
    """Start a detached, uniquely recognisable sleep on ``name`` over SSH; return its marker."""
    marker = f"{300 + uuid.uuid4().int % 10_000}.{uuid.uuid4().int % 10_000}"
    _ssh(lab, name, f"setsid sleep {marker} </dev/null >/dev/null 2>&1 &")
    return marker


def _has_sleeper(host: LabHost, marker: str) -> bool:
    return any(cmd == f"sleep {marker}" for _, cmd in host.processes())


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def bridge_existed() -> bool:
    return _link_exists(BRIDGE)


@pytest.fixture(scope="module")
def lab(bridge_existed: bool) -> Iterator[HostLab]:
    """This module's own lab (overrides conftest's session lab): the last test stops it."""
    lab = HostLab.start(3)
    yield lab
    lab.stop()


@pytest.fixture
def netns_lab(lab: HostLab) -> HostLab:
    if lab.mode != "netns":
        pytest.skip("needs network namespaces")
    return lab


# ------------------------------------------------------------------- basics


def test_lab_shape(lab: HostLab) -> None:
    assert [h.name for h in lab.hosts] == ["sg-host1", "sg-host2", "sg-host3"]
    assert len({h.address for h in lab.hosts}) == 3
    for path in (lab.ssh_config, lab.known_hosts, lab.identity):
        assert path.is_file()
    paramiko.Ed25519Key.from_private_key_file(str(lab.identity))
    config = lab.ssh_config.read_text()
    known = lab.known_hosts.read_text()
    for host in lab.hosts:
        assert f"Host {host.name}\n" in config
        names = (host.name, host.address) if host.port == 22 else (f"[{host.name}]:{host.port}",)
        assert all(name in known for name in names)
    if lab.mode == "netns":
        assert lab.gateway_address == "10.250.0.1"
        assert [h.hostname for h in lab.hosts] == [h.name for h in lab.hosts]
        assert all(h.netns in _netns_list() for h in lab.hosts)
    else:
        assert lab.gateway_address == "127.0.0.1"


def test_paramiko_connects_to_every_host(lab: HostLab) -> None:
    for host in lab.hosts:
        assert _ssh(lab, host.name, "hostname").strip() == host.hostname
        assert _ssh(lab, host.name, "id -u").strip() == "0"


def test_unknown_client_key_is_refused(lab: HostLab, tmp_path: Path) -> None:
    key_file = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)], check=True, timeout=10)
    host = lab.hosts[0]
    client = paramiko.SSHClient()
    client.load_host_keys(str(lab.known_hosts))
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(
            host.address,
            port=host.port,
            username="root",
            key_filename=str(key_file),
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
    client.close()


def test_host_key_is_checked(lab: HostLab, tmp_path: Path) -> None:
    """Each host has its own key: host 2's key does not verify host 1."""
    host1 = lab.hosts[0]
    wrong = tmp_path / "known_hosts"
    key2 = lab.known_hosts.read_text().splitlines()[1].split(" ", 1)[1]
    wrong.write_text(f"{host1.address} {key2}\n" if host1.port == 22 else f"[{host1.address}]:{host1.port} {key2}\n")
    client = paramiko.SSHClient()
    client.load_host_keys(str(wrong))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect(
            host1.address,
            port=host1.port,
            username="root",
            key_filename=str(lab.identity),
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
    client.close()


def test_run_executes_inside_the_host(netns_lab: HostLab) -> None:
    host = netns_lab.hosts[1]
    assert host.run(["hostname"]).stdout.strip() == "sg-host2"
    assert host.run([sys.executable, "-c", "import socket; print(socket.gethostname())"]).stdout.strip() == "sg-host2"
    addresses = host.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f" {host.address}/24 " in addresses
    assert host.run(["false"], check=False).returncode == 1


# ------------------------------------------------------------------- isolation


def test_private_etc_hosts(netns_lab: HostLab) -> None:
    out = _ssh(netns_lab, "sg-host1", "getent hosts gateway sg-host1 sg-host2 sg-host3")
    resolved = {line.split()[1]: line.split()[0] for line in out.splitlines()}
    assert resolved["gateway"] == "10.250.0.1"
    for host in netns_lab.hosts:
        assert resolved[host.name] == host.address


def test_private_kernels_dir(netns_lab: HostLab) -> None:
    name = f"probe-{uuid.uuid4().hex[:8]}"
    _ssh(netns_lab, "sg-host1", f"mkdir -p {KERNELS_DIR}/{name} && echo '{{}}' > {KERNELS_DIR}/{name}/kernel.json")
    assert _ssh(netns_lab, "sg-host1", f"cat {KERNELS_DIR}/{name}/kernel.json").strip() == "{}"
    assert netns_lab.hosts[0].run(["test", "-f", f"{KERNELS_DIR}/{name}/kernel.json"], check=False).returncode == 0
    assert _ssh(netns_lab, "sg-host2", f"ls -A {KERNELS_DIR}").strip() == ""
    assert netns_lab.hosts[2].run(["test", "-e", f"{KERNELS_DIR}/{name}"], check=False).returncode == 1
    assert not Path(KERNELS_DIR, name).exists()


def test_host_reaches_gateway(netns_lab: HostLab) -> None:
    """A host can open a TCP connection back to the gateway (the kernel callback path)."""
    with socket.create_server((netns_lab.gateway_address, 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(10)
        received: list[bytes] = []

        def accept() -> None:
            conn, _ = server.accept()
            with conn:
                received.append(conn.recv(100))

        thread = threading.Thread(target=accept)
        thread.start()
        code = f"import socket; socket.create_connection(('gateway', {port}), timeout=5).sendall(b'hello')"
        netns_lab.hosts[2].run([sys.executable, "-c", code])
        thread.join(10)
    assert received == [b"hello"]


def test_processes_are_per_host(lab: HostLab) -> None:
    host1, host2 = lab.hosts[0], lab.hosts[1]
    marker = _start_sleeper(lab, host1.name)
    assert _wait_for(lambda: _has_sleeper(host1, marker))
    assert not _has_sleeper(host2, marker)
    pid = next(pid for pid, cmd in host1.processes() if cmd == f"sleep {marker}")
    assert host1.sshd_pid not in {p for p, _ in host1.processes()}
    os.kill(pid, signal.SIGKILL)
    assert _wait_for(lambda: not _has_sleeper(host1, marker))


# ------------------------------------------------------------------- failures


def test_stop_and_start_sshd(lab: HostLab) -> None:
    host = lab.hosts[2]
    marker = _start_sleeper(lab, host.name)
    idle = _connect(lab, host.name)
    host.stop_sshd()
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host.address, host.port), timeout=5).close()
        assert _wait_for(lambda: not idle.get_transport().is_active())  # type: ignore[union-attr]
        assert _has_sleeper(host, marker), "processes started over SSH survive sshd going down"
    finally:
        idle.close()
        host.start_sshd()
    assert _ssh(lab, host.name, "hostname").strip() == host.hostname
    assert _has_sleeper(host, marker)
    if lab.mode == "netns":  # the host kept its filesystem across the restart
        host.run(["touch", f"{KERNELS_DIR}/kept"])
        host.stop_sshd()
        host.start_sshd()
        assert _ssh(lab, host.name, f"ls {KERNELS_DIR}").split() == ["kept"]
        host.run(["rm", f"{KERNELS_DIR}/kept"])


def test_cut_and_restore_network(netns_lab: HostLab) -> None:
    host = netns_lab.hosts[1]
    host.cut_network()
    try:
        with pytest.raises(OSError):
            socket.create_connection((host.address, host.port), timeout=1).close()
    finally:
        host.restore_network()
    assert _wait_for(lambda: _try_connect(host.address, host.port), timeout=10)
    assert _ssh(netns_lab, host.name, "hostname").strip() == host.name


def _try_connect(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
    except OSError:
        return False
    return True


def test_firewall_ssh_only() -> None:
    """Uses its own one-host lab, so the module lab keeps an open network."""
    if not (shutil.which("nft") or shutil.which("iptables")):
        pytest.skip("neither nft nor iptables installed")
    with lab_hosts(1) as lab:
        if lab.mode != "netns":
            pytest.skip("needs network namespaces")
        host = lab.hosts[0]
        probe = "import socket,time; s=socket.create_server(('0.0.0.0', 8765)); time.sleep(30)"
        listener = subprocess.Popen(["nsenter", "-t", str(host.sshd_pid), "-n", sys.executable, "-c", probe])
        try:
            assert _wait_for(lambda: _try_connect(host.address, 8765))
            host.firewall_ssh_only()
            assert not _try_connect(host.address, 8765)
            assert _ssh(lab, host.name, "hostname").strip() == host.name
        finally:
            listener.kill()
            listener.wait(5)


# ------------------------------------------------------------------- lifecycle


def test_loopback_mode() -> None:
    with lab_hosts(2, mode="loopback") as lab:
        assert lab.mode == "loopback"
        assert lab.gateway_address == "127.0.0.1"
        assert all(h.netns is None and h.address.startswith("127.") for h in lab.hosts)
        for host in lab.hosts:
            assert _ssh(lab, host.name, "hostname").strip() == socket.gethostname() == host.hostname
        marker = _start_sleeper(lab, "sg-host2")
        assert _wait_for(lambda: _has_sleeper(lab.hosts[1], marker))
        assert not _has_sleeper(lab.hosts[0], marker)
        lab_dir = lab.dir
    assert not lab_dir.exists()
    assert not _pids_mentioning(str(lab_dir))
    assert not _pids_mentioning(f"sleep {marker}")


def test_stale_lab_is_swept() -> None:
    """A lab whose owner was SIGKILLed is removed by the next start."""
    code = (
        "import sys, time; from testlab.hostlab import HostLab; lab = HostLab.start(1); "
        "print(lab.hosts[0].netns, lab.hosts[0].veth, lab.dir, flush=True); time.sleep(60)"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert owner.stdout is not None
        netns, veth, lab_dir = owner.stdout.readline().split()
    finally:
        owner.kill()
        owner.wait(10)
    assert netns in _netns_list()
    if netns != "None":
        assert _link_exists(veth)
    with lab_hosts(1) as fresh:
        assert netns not in _netns_list()
        assert not Path(lab_dir).exists()
        assert not _pids_mentioning(lab_dir)
        assert _ssh(fresh, "sg-host1", "hostname").strip() == fresh.hosts[0].hostname
    if netns != "None":
        assert not _link_exists(veth)


def test_stop_removes_everything(lab: HostLab, bridge_existed: bool) -> None:
    """Runs last: stops the module lab and checks nothing of it remains."""
    namespaces = [h.netns for h in lab.hosts if h.netns]
    veths = [h.veth for h in lab.hosts if h.veth]
    lab_dir = lab.dir
    _start_sleeper(lab, "sg-host1")
    lab.stop()
    lab.stop()  # idempotent
    assert not set(namespaces) & set(_netns_list())
    assert not any(_link_exists(v) for v in veths)
    assert not lab_dir.exists()
    assert not _pids_mentioning(str(lab_dir))
    other_labs = any(ns.startswith("sgh-") for ns in _netns_list())
    if bridge_existed:
        assert _link_exists(BRIDGE)
    elif not other_labs:
        assert not _link_exists(BRIDGE)
