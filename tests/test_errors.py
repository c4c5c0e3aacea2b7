"""Bad input and failures: each one a clear error, and nothing left behind."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from traitlets import TraitError

from spark_gateway.provisioner import DistributedProvisioner
from tests.conftest import add_spec, env, kernel_processes, wait_for

ASYNC = pytest.mark.asyncio


def _argv_edit(index: int, value: str):
    def edit(spec: dict) -> None:
        spec["argv"][index] = value

    return edit


@ASYNC
async def test_bad_interpreter_fails_fast_with_log_tail(lab, managers, kernels_dir):
    add_spec(kernels_dir, "bad_interp", _argv_edit(0, "/nonexistent/bin/python3"))
    km = managers("bad_interp", launch_timeout=60)
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[0].name))
    message = str(info.value)
    assert time.monotonic() - started < 30  # far inside launch_timeout: it did not wait for it
    assert lab.hosts[0].name in message and "exit status" in message
    assert "/nonexistent/bin/python3" in message  # the log tail says what failed


@ASYNC
async def test_import_error_fails_fast(lab, managers, kernels_dir, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken")
    (broken / "ipykernel").mkdir()
    (broken / "ipykernel" / "__init__.py").write_text("raise ImportError('ipykernel is broken on this host')\n")

    def edit(spec: dict) -> None:
        spec["env"]["PYTHONPATH"] = str(broken)

    add_spec(kernels_dir, "bad_import", edit)
    km = managers("bad_import", launch_timeout=60)
    started = time.monotonic()
    with pytest.raises(Exception, match="ipykernel is broken on this host") as info:
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[1].name))
    assert time.monotonic() - started < 30
    assert "exit status 1" in str(info.value)


@ASYNC
async def test_bad_kernel_class_fails_fast(lab, managers, kernels_dir):
    add_spec(kernels_dir, "bad_class", _argv_edit(-1, "no_such_module.NoKernel"))
    km = managers("bad_class", launch_timeout=60)
    with pytest.raises(Exception, match="no_such_module") as info:
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[2].name))
    assert lab.hosts[2].name in str(info.value)


@ASYNC
async def test_silent_kernel_is_killed_at_launch_timeout(lab, managers, kernels_dir):
    def edit(spec: dict) -> None:
        spec["argv"] = [
            sys.executable,
            "-c",
            "import time; print('never calls back', flush=True); time.sleep(300)",
            "{kernel_id}",
        ]

    add_spec(kernels_dir, "silent", edit)
    host = lab.hosts[0]
    km = managers("silent", launch_timeout=3)
    with pytest.raises(Exception, match="launch_timeout=3") as info:
        await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
    assert "never calls back" in str(info.value)
    assert wait_for(lambda: not [p for p in host.processes() if "never calls back" in p[1]], 2)


@ASYNC
async def test_unreachable_host_is_a_clear_error(lab, managers):
    host = lab.hosts[2]
    host.stop_sshd()
    try:
        km = managers(ssh_connect_timeout=3)
        with pytest.raises(Exception) as info:
            await km.start_kernel(env=env(KERNEL_REMOTE_HOST=host.name))
        assert info.value.status_code == 503
        assert host.name in str(info.value) and "sshd listens" in str(info.value)
    finally:
        host.start_sshd()


def _ssh_config(path: Path, host, identity: Path, known_hosts: Path) -> Path:
    path.write_text(
        f"Host {host.name}\n  HostName {host.address}\n  Port {host.port}\n  User root\n"
        f"  IdentityFile {identity}\n  UserKnownHostsFile {known_hosts}\n  StrictHostKeyChecking yes\n"
    )
    return path


@ASYNC
async def test_unknown_host_key_is_refused_with_how_to_trust_it(lab, managers, tmp_path):
    host = lab.hosts[0]
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cfg = _ssh_config(tmp_path / "config", host, lab.identity, empty)
    km = managers(ssh_config_file=str(cfg), remote_hosts=[host.name])
    with pytest.raises(Exception) as info:
        await km.start_kernel(env=env())
    message = str(info.value)
    assert "unknown" in message and f"ssh-keyscan -p {host.port} {host.address}" in message
    assert str(empty) in message


@ASYNC
async def test_authentication_failure_names_user_host_and_keys(lab, managers, tmp_path):
    host = lab.hosts[1]
    stranger = tmp_path / "id_stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    cfg = _ssh_config(tmp_path / "config", host, stranger, lab.known_hosts)
    km = managers(ssh_config_file=str(cfg), remote_hosts=[host.name])
    with pytest.raises(Exception) as info:
        await km.start_kernel(env=env())
    message = str(info.value)
    assert "authentication as 'root'" in message
    assert f"{host.address}:{host.port}" in message and str(stranger) in message


@ASYNC
async def test_authorization(lab, managers):
    km = managers()
    with pytest.raises(Exception, match="'root' is not allowed.*unauthorized_users") as info:
        await km.start_kernel(env=env(KERNEL_USERNAME="root"))
    assert info.value.status_code == 403
    km = managers(authorized_users=["carol"])
    with pytest.raises(Exception, match="'alice' is not allowed.*authorized_users"):
        await km.start_kernel(env=env())
    km = managers(authorized_users=["alice"])
    await km.start_kernel(env=env())
    assert await km.is_alive()


@ASYNC
async def test_invalid_client_env_name_is_refused(lab, managers):
    km = managers()
    with pytest.raises(Exception, match="KERNEL_NOT-VALID") as info:
        await km.start_kernel(env=env(**{"KERNEL_NOT-VALID": "x"}))
    assert info.value.status_code == 400
    assert not any(kernel_processes(h, km.kernel_id) for h in lab.hosts)


@ASYNC
async def test_client_port_range_is_validated(lab, managers):
    km = managers()
    with pytest.raises(Exception, match="at least 1000") as info:
        await km.start_kernel(env=env(KERNEL_PORT_RANGE="40000..40010"))
    assert info.value.status_code == 400


@ASYNC
async def test_kernel_ports_honour_the_port_range(lab, managers):
    km = managers(port_range="42000..43500")
    await km.start_kernel(env=env(KERNEL_REMOTE_HOST=lab.hosts[1].name))
    info = km.get_connection_info()
    ports = [info[f"{c}_port"] for c in ("shell", "iopub", "stdin", "control", "hb")]
    assert all(42000 <= p <= 43500 for p in ports), ports
    assert 42000 <= km.provisioner.listener[1] <= 43500


@pytest.mark.parametrize(
    ("trait", "value", "message"),
    [
        ("load_balancing_algorithm", "random", "use one of: round-robin, least-connection"),
        ("port_range", "1..2", "within 1024..65535"),
        ("port_range", "40000-41000", "not of the form LOWER..UPPER"),
        ("port_range", "40000..40500", "at least 1000"),
        ("remote_hosts", ["good", "bad:99999"], "port must be a number from 1 to 65535"),
        ("remote_hosts", ["-oProxyCommand=touch /tmp/x"], "is not a host name"),
    ],
)
def test_bad_configuration_is_rejected_with_the_valid_choices(trait, value, message):
    with pytest.raises(TraitError, match=message):
        DistributedProvisioner(**{trait: value})


def test_bad_environment_configuration_is_rejected(monkeypatch):
    monkeypatch.setenv("GP_LOAD_BALANCING_ALGORITHM", "fastest")
    with pytest.raises(TraitError, match="'fastest' is not supported; use one of"):
        _ = DistributedProvisioner().load_balancing_algorithm
    monkeypatch.setenv("GP_PORT_RANGE", "9..8")
    with pytest.raises(TraitError, match="9..8"):
        _ = DistributedProvisioner().port_range


def test_environment_defaults_are_read(monkeypatch):
    monkeypatch.setenv("GP_REMOTE_HOSTS", "h1, h2:2222,h3")
    monkeypatch.setenv("GP_LOAD_BALANCING_ALGORITHM", "least-connection")
    monkeypatch.setenv("GP_UNAUTHORIZED_USERS", "root,admin")
    monkeypatch.setenv("GP_LAUNCH_TIMEOUT", "12.5")
    p = DistributedProvisioner()
    assert p.remote_hosts == ["h1", "h2:2222", "h3"]
    assert p.load_balancing_algorithm == "least-connection"
    assert p.unauthorized_users == {"root", "admin"}
    assert p.launch_timeout == 12.5
