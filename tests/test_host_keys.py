"""ssh_config `StrictHostKeyChecking accept-new` is trust on first use, as in OpenSSH (issue 12), on a lab host."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from spark_gateway.ssh import HostKeyError, SshPool, SshSettings
from testlab.hostlab import HostLab


def test_accept_new_saves_the_first_key_and_refuses_a_changed_one(lab: HostLab, tmp_path: Path) -> None:
    host = lab.hosts[-1]
    known = tmp_path / "ssh" / "known_hosts"  # its directory does not exist yet either
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host {host.name}\n    HostName {host.address}\n    Port {host.port}\n    User root\n"
        f"    IdentityFile {lab.identity}\n    UserKnownHostsFile {known}\n    StrictHostKeyChecking accept-new\n"
    )

    def connect() -> int:
        pool = SshPool(SshSettings(config_file=str(config)))
        try:
            return pool.run(host.name, "true").status
        finally:
            pool.close()

    assert connect() == 0
    saved = known.read_text().split()
    host_pub = (host.dir / "ssh_host_ed25519_key.pub").read_text().split()
    name = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    assert saved == [name, *host_pub[:2]] and (known.stat().st_mode & 0o777) == 0o600
    assert connect() == 0 and known.read_text().split() == saved  # the saved key matches: nothing added

    key = host.dir / "ssh_host_ed25519_key"
    backup = tmp_path / "original"
    backup.mkdir()
    for path in (key, key.with_suffix(".pub")):
        shutil.copy2(path, backup / path.name)
    try:
        host.stop_sshd(drop_connections=False)
        key.unlink()
        key.with_suffix(".pub").unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=20)
        host.start_sshd()
        with pytest.raises(HostKeyError, match="does not match the one in"):
            connect()
        assert known.read_text().split() == saved
    finally:
        host.stop_sshd(drop_connections=False)
        for path in (key, key.with_suffix(".pub")):
            shutil.copy2(backup / path.name, path)
        host.start_sshd()
