"""Values the kernel's callback reports (pid, pgid, connection file) are the kernel user's data (pure, no I/O).

The gateway acts on them only within bounds it can check itself: pid and pgid above 1; without impersonation the
process group is the one its launch shell created (the kernel runs as the gateway's SSH account then, so that
account is the only one at stake); with impersonation every host command on them runs as the kernel's user
(`as_user`), who can only reach what they could reach anyway. The connection file must be the launcher's own
`sg-kernel-<id>.json`, an absolute, normalised path.
"""

from __future__ import annotations

import posixpath
import shlex
from typing import Any


class ReportRefused(ValueError):
    """A callback value the gateway will not act on; the message names it."""


def check_report(info: dict[str, Any], kernel_id: str, launched_pid: int, impersonated: bool) -> None:
    """Refuse pid/pgid <= 1, a foreign process group (not impersonated), or an unexpected connection-file path."""
    pid, pgid = info.get("pid"), info.get("pgid")
    for name, value in (("pid", pid), ("pgid", pgid)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 1:
            raise ReportRefused(f"the kernel reported {name} {value!r}: a kernel's {name} is a number above 1")
    if not impersonated and pgid != launched_pid:
        raise ReportRefused(f"the kernel reported process group {pgid}, but its launch created group {launched_pid}")
    path = info.get("connection_file")
    expected = f"sg-kernel-{kernel_id}.json"
    if path is not None and (
        not isinstance(path, str)
        or not posixpath.isabs(path)
        or posixpath.normpath(path) != path
        or posixpath.basename(path) != expected
    ):
        raise ReportRefused(f"the kernel reported connection file {path!r}: expected an absolute path to {expected}")


def as_user(command: str, user: str | None) -> str:
    """`command` run as `user` with `sudo -n` (the gateway's impersonation right), or as is when `user` is None."""
    if user is None:
        return command
    return f"sudo -n -u {shlex.quote(user)} -- /bin/sh -c {shlex.quote(command)}"
