"""A kernel start request judged whole: everything a launch needs, or every 400/403 it deserves, before any I/O.

`LaunchRequest.build` is a pure function of the kernel id, the kernelspec, the start request's environment and the
provisioner's options. It touches no host, no SSH connection and no server, so a malformed request is refused at
once even when every host is down, and the lifecycle (`provisioner.py`) only consumes what it returns.
"""

from __future__ import annotations

import getpass
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import yarn
from .config import GatewayOptions, check_port_range_narrows
from .errors import ProvisionerError
from .placement import PlacementError, check_pin
from .remote import LaunchScriptError, check_env, spec_value
from .spark import INIT_FLAG, SparkOptsError, check_extra_spark_opts, spec_master
from .ssh import resolve
from .users import UserRefused, authorize

KERNEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


@dataclass(frozen=True)
class LaunchRequest:
    """What one kernel start asks for, validated."""

    kernel_id: str
    username: str
    run_as: str | None  # whom `sudo -u` runs the kernel as (None: the SSH account)
    port_range: str
    pinned: str | None  # KERNEL_REMOTE_HOST, a configured host
    exports: dict[str, str]  # name -> shell word (quoted): client KERNEL_* values, the spec's env, Spark settings
    spark_mode: str  # lazy, eager or none (not a Spark kernel)
    working_dir: str | None  # KERNEL_WORKING_DIR

    @classmethod
    def build(
        cls, kernel_id: str, spec: Any, env: Mapping[str, str], argv: list[str], options: GatewayOptions
    ) -> LaunchRequest:
        """Judge the request: raise ProvisionerError (400 malformed, 403 not allowed, 500 broken kernelspec)."""
        if not KERNEL_ID.match(kernel_id or ""):
            raise ProvisionerError(400, f"kernel id {kernel_id!r} is not a valid id (letters, digits, . _ -)")
        values = {k: v for k, v in env.items() if k.startswith("KERNEL_")}
        username = _authorize(values, options)
        values.update(KERNEL_ID=kernel_id, KERNEL_USERNAME=username)
        _check(lambda: [check_env(name, value) for name, value in values.items()], LaunchScriptError)
        port_range = values.get("KERNEL_PORT_RANGE") or options.port_range
        _check(lambda: check_port_range_narrows(options.port_range, port_range), ValueError)
        pinned = values.get("KERNEL_REMOTE_HOST") or None
        if pinned:
            _check(lambda: check_pin(options.remote_hosts, pinned), PlacementError, status=403)
        spec_env = {name: str(value) for name, value in (spec.env or {}).items()}
        master = spec_master(spec_env.get("SPARK_OPTS", ""))
        if "SPARK_OPTS" in spec_env and "KERNEL_EXTRA_SPARK_OPTS" in values:
            _check(lambda: check_extra_spark_opts(values["KERNEL_EXTRA_SPARK_OPTS"]), SparkOptsError)
        words = {name: shlex.quote(value) for name, value in values.items()}
        for name, template in spec_env.items():
            if name not in values:
                try:
                    check_env(name, template)
                except LaunchScriptError as exc:
                    raise ProvisionerError(500, f"kernelspec {spec.display_name!r}: {exc}") from None
                words[name] = spec_value(template, values)
        if master == "yarn" and "SPARK_OPTS" in words:
            tags = yarn.submit_conf(kernel_id, options.yarn_gateway_id)  # tags, one attempt (yarn.py)
            words["SPARK_OPTS"] += shlex.quote(tags)
        run_as = None
        # Impersonation: every kernel runs as its user (sudo), so its YARN application is theirs by the process's own
        # identity. No --proxy-user: Hadoop would then require the user to hold the right to impersonate themself.
        if options.impersonation_enabled:
            words["GP_IMPERSONATION_ENABLED"] = "True"
            run_as = username
        mode = argv[argv.index(INIT_FLAG) + 1] if INIT_FLAG in argv[:-1] else "none"
        return cls(
            kernel_id=kernel_id,
            username=username,
            run_as=run_as,
            port_range=port_range,
            pinned=pinned,
            exports=words,
            spark_mode=mode,
            working_dir=values.get("KERNEL_WORKING_DIR") or None,
        )


def _authorize(values: Mapping[str, str], options: GatewayOptions) -> str:
    """KERNEL_USERNAME by the canonical rule of `users.authorize` (400 malformed, 403 not allowed)."""
    accounts = {getpass.getuser()}
    if options.impersonation_enabled:  # the SSH logins hold the sudo right (ssh_config is read, no host is used)
        settings = options.ssh_settings()
        accounts |= {resolve(entry, settings).user for entry in options.remote_hosts}
    try:
        return authorize(
            values.get("KERNEL_USERNAME"),
            default=getpass.getuser(),
            authorized=options.authorized_users,
            unauthorized=options.unauthorized_users,
            impersonating=options.impersonation_enabled,
            gateway_accounts=accounts,
        )
    except UserRefused as exc:
        raise ProvisionerError(exc.status, exc.message) from None


def _check(check: Any, errors: type[Exception] | tuple[type[Exception], ...], status: int = 400) -> None:
    """Run `check`; its error (one of `errors`) becomes a ProvisionerError with `status` and the same message."""
    try:
        check()
    except errors as exc:
        raise ProvisionerError(status, str(exc)) from None
