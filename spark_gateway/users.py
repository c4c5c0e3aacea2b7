"""Who a kernel runs as: one canonical rule for `KERNEL_USERNAME` and the gateway's user lists (pure, no I/O).

The rule: a client's user name is accepted only as a plain POSIX user name, `[a-z_][a-z0-9_-]{0,31}`, exactly
as sent. Anything else (`ROOT`, ` root`, `root\\n`, `root@EXAMPLE.COM`, full-width or other look-alike letters) is
refused with 400 before any host is touched, so no variant a host's name service might map onto another account
can reach `sudo -u` or `--proxy-user`. The operator's lists are compared in a canonical form (NFKC, stripped,
case-folded), so `unauthorized_users = {"Root"}` still refuses `root`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}\Z")
RULE = "a plain POSIX user name: lower-case a-z, digits, _ and -, starting with a letter or _, at most 32"


@dataclass
class UserRefused(Exception):
    """A user name that may not start a kernel: `status` is 400 (malformed) or 403 (not allowed)."""

    status: int
    message: str

    def __str__(self) -> str:
        return self.message


def canonical(name: str) -> str:
    """The form operator-configured names are compared in: NFKC-normalised, stripped, case-folded."""
    return unicodedata.normalize("NFKC", name).strip().casefold()


def check_user_name(name: str, what: str = "KERNEL_USERNAME") -> str:
    """Return `name` if it is a plain POSIX user name; raise UserRefused(400) saying why not."""
    if not USER_NAME.match(name):
        raise UserRefused(400, f"{what} {name!r} is not {RULE} (e.g. alice; not Alice, alice@REALM or ' alice')")
    return name


def authorize(
    requested: str | None,
    *,
    default: str,
    authorized: Iterable[str],
    unauthorized: Iterable[str],
    impersonating: bool,
    gateway_accounts: Iterable[str] = (),
) -> str:
    """The user a kernel starts for, or UserRefused.

    Without impersonation an absent `KERNEL_USERNAME` means `default` (the gateway's own user). With it the name
    is required, and root and the gateway's own accounts (`gateway_accounts`: its SSH logins, which hold the sudo
    right) are refused: a kernel running as them would give its user every other account.
    """
    if not requested:
        if impersonating:
            raise UserRefused(400, "KERNEL_USERNAME is required when the gateway impersonates users: send the "
                                   "notebook user's name in the start request's env")  # fmt: skip
        requested = default
    name = check_user_name(requested)
    if impersonating and (name == "root" or name in {canonical(a) for a in gateway_accounts}):
        raise UserRefused(403, f"user {name!r} may not start kernels: with impersonation enabled it would run as "
                               "root or as the gateway's own account")  # fmt: skip
    if name in {canonical(u) for u in unauthorized}:
        raise UserRefused(403, f"user {name!r} is not allowed to start kernels (listed in unauthorized_users)")
    allowed = {canonical(u) for u in authorized}
    if allowed and name not in allowed:
        raise UserRefused(403, f"user {name!r} is not allowed to start kernels (not listed in authorized_users)")
    return name
