"""Per-user kernel limits, counted from the hosts' truth (like placement), so they hold across gateways and restarts.

Each host is asked over the pooled connection which kernels run there and for whom: the kernel id comes from the
launcher's ``--kernel-id`` argument, the user from the ``KERNEL_USERNAME`` the gateway exported into the kernel's
environment (``/proc/PID/environ`` is fixed at exec: neither the client nor the kernel's code can rewrite it for
the process), or, where that environment cannot be read (a kernel impersonated with ``sudo -u``), the process's
owner, which is then that user. Launches still in flight from this gateway count too.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

# Prints "KERNEL_ID USER" for each process started with --kernel-id (several per kernel: deduplicated by id).
USER_INVENTORY = (
    "ps -ww -eo pid=,user:64=,args= | grep -e '--kernel-id [A-Za-z0-9._-]' | "
    "while read -r pid owner args; do "
    "kid=$(printf '%s\\n' \"$args\" | grep -o -e '--kernel-id [A-Za-z0-9._-]*' | head -n 1 | cut -d ' ' -f 2); "
    "name=$(tr '\\000' '\\n' < /proc/$pid/environ 2>/dev/null | sed -n 's/^KERNEL_USERNAME=//p' | head -n 1); "
    '[ -n "$kid" ] && echo "$kid ${name:-$owner}"; '
    "done; true"
)
_LINE = re.compile(r"([A-Za-z0-9._-]+) (\S+)\Z")


def parse_user_inventory(text: str) -> dict[str, str]:
    """Kernel id -> user, from USER_INVENTORY's output (the first user seen for an id wins)."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            users.setdefault(m[1], m[2])
    return users


@dataclass
class UserLaunches:
    """This gateway's launches that passed the limit and are still starting (hosts do not show them yet)."""

    launching: dict[str, tuple[str, float]] = field(default_factory=dict)  # kernel id -> (user, admitted at)

    def begin(self, kernel_id: str, username: str) -> list[str]:
        """Admit `kernel_id`; returns the same user's launches admitted before it and still starting."""
        earlier = [k for k, (u, _) in self.launching.items() if u == username and k != kernel_id]
        self.launching[kernel_id] = (username, time.monotonic())
        return earlier

    def end(self, kernel_id: str) -> None:
        self.launching.pop(kernel_id, None)


def refusal(username: str, limit: int, running: dict[str, list[str]], starting: list[str]) -> str | None:
    """The 403 message when `username` may not start another kernel, else None. `running`: host -> kernel ids."""
    count = sum(len(ids) for ids in running.values()) + len(starting)
    if count < limit:
        return None
    where = [f"{', '.join(sorted(ids))} on {host}" for host, ids in sorted(running.items()) if ids]
    if starting:
        where.append(f"{', '.join(starting)} starting")
    return (
        f"user {username!r} already runs {count} kernel(s), the most allowed (max_kernels_per_user={limit}): "
        f"{'; '.join(where)}. Shut one of them down first."
    )


async def running_for(
    username: str, hosts: list[str], inventory: Callable[[str], Awaitable[str]]
) -> tuple[dict[str, list[str]], list[str]]:
    """Kernel ids `username` runs on each host, and the hosts that could not be asked (with the reason)."""
    answers = await asyncio.gather(*(inventory(h) for h in hosts), return_exceptions=True)
    running: dict[str, list[str]] = {}
    unknown: list[str] = []
    for host, answer in zip(hosts, answers, strict=True):
        if isinstance(answer, BaseException):
            unknown.append(f"{host}: {answer or type(answer).__name__}")
            continue
        running[host] = sorted(k for k, u in parse_user_inventory(answer).items() if u == username)
    return running, unknown
