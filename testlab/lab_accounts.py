"""Local user accounts on one lab host, for impersonation tests: the gateway's own SSH account and notebook users.

The accounts exist inside that host only: its private mount namespace gets bind-mounted copies of /etc/passwd,
/etc/group, /etc/shadow and /etc/sudoers with the extra lines (this machine's files are never changed). Each user
has a 0700 home under a fresh 0755 base directory; the gateway's SSH account has the sudo right an operator gives
it (README, *Security model*). Everything is unmounted and removed again on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testlab.hostlab import LabHost

SUDOERS = """Defaults env_reset
Defaults secure_path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
root ALL=(ALL:ALL) ALL
{gateway} ALL=({users}) NOPASSWD:SETENV: ALL
"""


@dataclass
class Accounts:
    """What `lab_accounts` made: names to uids, the gateway's SSH account, and the base directory."""

    host: LabHost
    gateway: str
    uids: dict[str, int]
    base: Path

    def home(self, name: str) -> Path:
        return self.base / "home" / name


def _free_uids(count: int) -> list[int]:
    taken = {int(line.split(":")[2]) for line in Path("/etc/passwd").read_text().splitlines() if line.count(":") >= 2}
    return [uid for uid in range(51000, 60000) if uid not in taken][:count]


@contextlib.contextmanager
def lab_accounts(
    host: LabHost,
    gateway: str,
    users: list[str],
    authorized_keys: Path,
    visible: tuple[Path, ...] = (),
    groups: dict[str, str] | None = None,
) -> Iterator[Accounts]:
    """`gateway` (may `sudo -u` any of `users`, nothing else) and `users`, on `host` only (netns lab).

    sshd reads `authorized_keys` (the lab's, shared by every account) with the logging-in user's rights, so the
    lab directory is made traversable (not listable) and that file readable meanwhile. When our Python is under
    root's 0700 home, the host gets a /root the users may enter, showing only what they need: the Python's top
    directory there and those of `visible` (e.g. the YARN jars a NodeManager on that host still has to read).
    `groups` gives users a shared primary group (user -> group name); the others have their own.
    """
    base = Path(tempfile.mkdtemp(prefix="sg-accounts-"))
    base.chmod(0o755)
    names = [gateway, *users]
    shared = sorted(set((groups or {}).values()))
    ids = _free_uids(len(names) + len(shared))
    uids = dict(zip(names, ids, strict=False))
    gids = {name: uid for name, uid in uids.items() if name not in (groups or {})}
    gids |= dict(zip(shared, ids[len(names) :], strict=True))
    (base / "home").mkdir(mode=0o755)
    passwd = []
    group = [f"{name}:x:{gid}:" for name, gid in gids.items()]
    for name, uid in uids.items():
        home = base / "home" / name
        home.mkdir(mode=0o700)
        gid = gids[(groups or {}).get(name, name)]
        os.chown(home, uid, gid)
        passwd.append(f"{name}:x:{uid}:{gid}::{home}:/bin/sh")
    files = {
        "passwd": Path("/etc/passwd").read_text() + "\n".join(passwd) + "\n",
        "group": Path("/etc/group").read_text() + "\n".join(group) + "\n",
        "shadow": Path("/etc/shadow").read_text() + "".join(f"{name}:*:19000:0:99999:7:::\n" for name in uids),
        "sudoers": SUDOERS.format(gateway=gateway, users=",".join(users)),
    }
    mounts: list[tuple[Path, str]] = []
    for name, text in files.items():
        (base / name).write_text(text)
        (base / name).chmod({"sudoers": 0o440, "shadow": 0o640}.get(name, 0o644))
        mounts.append((base / name, f"/etc/{name}"))
    python = Path(os.path.realpath(sys.executable))
    if python.is_relative_to("/root"):  # e.g. pyenv under root's 0700 home: give the host a /root others may enter
        shown = base / "root"
        tops = dict.fromkeys(Path("/root", p.relative_to("/root").parts[0]) for p in (python, *visible)
                             if p.is_relative_to("/root") and p != Path("/root"))  # fmt: skip
        for top in tops:
            (shown / top.name).mkdir(parents=True)
            mounts.append((top, str(shown / top.name)))
        shown.chmod(0o711)
        mounts.append((shown, "/root"))
    done: list[str] = []
    modes = {path: path.stat().st_mode & 0o7777 for path in (authorized_keys.parent, authorized_keys)}
    try:
        authorized_keys.parent.chmod(modes[authorized_keys.parent] | 0o011)
        authorized_keys.chmod(modes[authorized_keys] | 0o044)
        for source, target in mounts:
            host.run(["mount", "--rbind", str(source), target])
            done.append(target)
        yield Accounts(host, gateway, uids, base)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
        for target in reversed(done):
            host.run(["umount", "--recursive", "--lazy", target], check=False)  # lazy: a leftover process may hold it
        shutil.rmtree(base, ignore_errors=True)
