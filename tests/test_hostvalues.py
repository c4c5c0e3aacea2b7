"""Callback values the gateway acts on (spark_gateway/hostvalues.py), and the launch script's log opening run by
a real /bin/sh (spark_gateway/remote.py: `log_lines`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from spark_gateway.hostvalues import ReportRefused, as_user, check_report
from spark_gateway.remote import log_lines

KID = "k-1"
GOOD = {"pid": 4242, "pgid": 4242, "connection_file": f"/home/alice/.local/share/jupyter/runtime/sg-kernel-{KID}.json"}


@pytest.mark.parametrize(
    ("change", "impersonated", "message"),
    [
        ({"pid": 1}, True, "pid 1"),
        ({"pgid": 0}, True, "pgid 0"),
        ({"pgid": -5}, False, "pgid -5"),
        ({"pid": True}, False, "pid True"),
        ({"pgid": 777}, False, "process group 777, but its launch created group 4242"),
        ({"connection_file": "/home/gw/.ssh/authorized_keys"}, True, "expected an absolute path to sg-kernel-k-1"),
        ({"connection_file": f"/tmp/../home/gw/sg-kernel-{KID}.json"}, True, "connection file"),
        ({"connection_file": f"sg-kernel-{KID}.json"}, True, "connection file"),
    ],
)
def test_values_the_gateway_will_not_act_on(change: dict[str, Any], impersonated: bool, message: str) -> None:
    with pytest.raises(ReportRefused, match=message.replace("(", r"\(")):
        check_report(GOOD | change, KID, 4242, impersonated)


def test_values_within_bounds() -> None:
    check_report(GOOD, KID, 4242, impersonated=False)
    check_report(GOOD | {"pgid": 777}, KID, 4242, impersonated=True)  # sudo's pty: acted on as the user only
    assert as_user("kill -9 -5", None) == "kill -9 -5"
    assert as_user("kill -9 -5", "alice") == "sudo -n -u alice -- /bin/sh -c 'kill -9 -5'"


def open_log(log: Path, private: bool) -> subprocess.CompletedProcess[str]:
    script = "\n".join([*log_lines(str(log), private), "echo written >&3", ""])
    return subprocess.run(["/bin/sh", "-s"], input=script, capture_output=True, text=True, timeout=10)


def test_log_is_created_private_and_appended_on_restart(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kernel-1.log"
    assert open_log(log, private=True).returncode == 0 and open_log(log, private=True).returncode == 0
    assert log.read_text() == "written\nwritten\n"
    assert (log.stat().st_mode & 0o777) == 0o600 and (log.parent.stat().st_mode & 0o777) == 0o700


def test_a_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("precious\n")
    (tmp_path / "dangling").mkdir()
    for log, points_to in ((tmp_path / "kernel-1.log", target), (tmp_path / "dangling" / "kernel-2.log", "nothing")):
        log.symlink_to(points_to)
        result = open_log(log, private=False)
        assert result.returncode == 98 and "cannot create the kernel log" in result.stderr
    assert target.read_text() == "precious\n" and not (tmp_path / "dangling" / "nothing").exists()


def test_a_private_log_dir_must_be_ours_and_no_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(real)
    result = open_log(tmp_path / "link" / "kernel-1.log", private=True)
    assert result.returncode == 98 and "is not a directory of this account" in result.stderr
    assert list(real.iterdir()) == []
    os.chown(real, 12345, 12345)
    result = open_log(real / "kernel-1.log", private=True)
    assert result.returncode == 98 and "is not a directory of this account" in result.stderr
