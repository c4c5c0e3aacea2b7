"""Spark Connect engines (connect-mode kernelspecs): the share key of a kernel and the host its engine runs on.

The engine itself is the host's (`kernel-launchers/python/scripts/spark_connect.py`): a kernel's launcher starts
it on its own host if none of that key runs there, it binds loopback with a random token, and it stops itself
after `engine_idle_timeout` without attached kernels. Group- and server-level engines under impersonation run as
`engine_account` instead: the gateway starts (or joins) them with `sudo -u ACCOUNT spark_connect.py ensure` on the
kernel's host before the kernel starts, granting the kernel's user the engine. The gateway decides the key and
sends the kernel to the host whose engine has that key (found with `ps` on every host: the hosts are the truth,
so gateways share engines and a restarted gateway finds them). See docs/design.md, Spark Connect engines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import hashlib
import posixpath
import pwd
import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import yarn
from .users import UserRefused, check_user_name

SHARE_FLAG = "--engine-share-level"
LEVELS = ("kernel", "user", "group", "server")
ENGINE_INVENTORY = "ps -ww -eo args= | grep -o -e 'spark_connect.py serve --engine-key [A-Za-z0-9._-]*' | sort -u"
_KEY = re.compile(r"--engine-key ([A-Za-z0-9._-]+)")


class EngineRefused(ValueError):
    """A connect-mode request that cannot be served (the message says why)."""


@dataclass(frozen=True)
class EnginePlan:
    """Which engine a connect-mode kernel uses."""

    key: str
    level: str
    account: str = ""  # the engine account it runs as (group and server levels under impersonation), else the kernel's

    def exports(self, idle_timeout: float) -> dict[str, str]:
        """The kernel's environment (shell words) that names its engine."""
        words = {
            "GP_ENGINE_KEY": shlex.quote(self.key),
            "GP_ENGINE_LEVEL": shlex.quote(self.level),
            "GP_ENGINE_IDLE_TIMEOUT": shlex.quote(f"{max(0.0, idle_timeout):g}"),
        }
        if self.account:
            words["GP_ENGINE_ACCOUNT"] = shlex.quote(self.account)
        return words


def share_level(argv: list[str]) -> str:
    """The spec's share level (argv `--engine-share-level`; default user)."""
    level = argv[argv.index(SHARE_FLAG) + 1] if SHARE_FLAG in argv[:-1] else "user"
    if level not in LEVELS:
        raise EngineRefused(f"kernelspec share level {level!r} is not one of {', '.join(LEVELS)}")
    return level


def primary_group(username: str) -> str:
    """The user's primary group on the gateway (group-level engines)."""
    try:
        return grp.getgrgid(pwd.getpwnam(username).pw_gid).gr_name
    except KeyError:
        raise EngineRefused(
            f"user {username!r} has no primary group on the gateway: group-level engines need a known user"
        ) from None


def engine_account_for(level: str, impersonating: bool, engine_account: str) -> str:
    """The account a group- or server-level engine runs as under impersonation ("" otherwise: the kernel's)."""
    if not impersonating or level not in ("group", "server"):
        return ""
    if not engine_account:
        raise EngineRefused(
            f"share level {level} with impersonation_enabled needs an engine account: set "
            "c.DistributedProvisioner.engine_account (GP_ENGINE_ACCOUNT) to the local account, present on every host, "
            "that group- and server-level engines run as, and let the gateway's SSH account `sudo -u` it (or use "
            "share level user or kernel)"
        )
    try:
        check_user_name(engine_account, "engine_account")
    except UserRefused as exc:
        raise EngineRefused(exc.message) from None
    if engine_account == "root":
        raise EngineRefused("engine_account must not be root: name an unprivileged account that runs engines")
    return engine_account


def plan(kernel_id: str, username: str, spec_name: str, argv: list[str], spec_env: dict[str, str],
         extra_opts: str, impersonating: bool = False, engine_account: str = "",
         group: str | None = None) -> EnginePlan:  # fmt: skip
    """The engine of a kernel. Kernels share it only when their Spark options are the same (the spec's SPARK_OPTS
    template and the client's KERNEL_EXTRA_SPARK_OPTS): different options get a separate engine. `group`: the
    user's primary group when known (from the hosts), else the gateway's."""
    level = share_level(argv)
    account = engine_account_for(level, impersonating, engine_account)
    if level == "kernel":
        return EnginePlan(f"kernel-{kernel_id}", level)
    owner = {"user": username, "server": "spec"}.get(level) or group or primary_group(username)
    digest = hashlib.sha256("\0".join((spec_name, spec_env.get("SPARK_OPTS", ""), extra_opts)).encode()).hexdigest()
    owner = re.sub(r"[^A-Za-z0-9._-]", "_", owner)[:64]  # e.g. a group name with blanks: still a valid key
    return EnginePlan(f"{level}-{owner}-{digest[:12]}", level, account)


def yarn_conf(engine: EnginePlan) -> str:
    """A YARN engine's tags: not the gateway's own tag, so reconciliation (which kills applications whose kernel is
    gone) never takes a shared engine; the engine ends its application itself when idle."""
    return f" --conf spark.yarn.maxAppAttempts=1 --conf spark.yarn.tags=spark_gateway_engine,{engine.key.lower()}"


def parse_inventory(text: str) -> set[str]:
    return set(_KEY.findall(text))


async def find_host(entries: list[str], key: str, run: Callable[[str], Awaitable[str]]) -> str | None:
    """The first host (in `entries` order) where an engine of `key` runs; hosts that do not answer are passed over."""

    async def ask(entry: str) -> set[str]:
        try:
            return parse_inventory(await run(entry))
        except Exception:  # noqa: BLE001 (a host that cannot be asked has no engine we can use)
            return set()

    found = await asyncio.gather(*(ask(entry) for entry in entries))
    return next((entry for entry, keys in zip(entries, found, strict=True) if key in keys), None)


async def host_group(provisioner: Any, entry: str, username: str) -> str:
    """The user's primary group on host `entry` (`id -gn`): under impersonation the hosts know the users."""
    from .errors import ProvisionerError

    host = await provisioner.cluster.host(entry)
    res = await host.arun(f"id -gn -- {shlex.quote(username)}", timeout=provisioner.ssh_connect_timeout + 5)
    group = res.stdout.strip()
    if res.status != 0 or not group:
        raise ProvisionerError(400, f"user {username!r} has no primary group on {entry} ({res.stderr.strip()}): "
                                    "group-level engines need users the hosts know")  # fmt: skip
    return group


async def place(provisioner: Any, request: Any, argv: list[str]) -> tuple[EnginePlan, str | None]:
    """The kernel's engine and the host it runs on now (None: no engine of that key runs; placement decides)."""
    spec = provisioner.kernel_spec
    env = {name: str(value) for name, value in (spec.env or {}).items()}
    extra = request.exports.get("KERNEL_EXTRA_SPARK_OPTS", "")
    spec_id = f"{spec.display_name}\0{argv[0] if argv else ''}"  # argv[0] is inside the spec's directory
    impersonating, account = provisioner.impersonation_enabled, provisioner.engine_account
    args = (request.kernel_id, request.username, spec_id, argv, env, extra, impersonating, account)
    level = share_level(argv)
    engine_account_for(level, impersonating, account)  # every refusal before any host is touched
    group = None
    if level == "group" and impersonating:  # the users are the hosts' (they run the kernels)
        group = await host_group(provisioner, request.pinned or list(provisioner.remote_hosts)[0], request.username)
    engine = plan(*args, group=group)
    cluster = provisioner.cluster

    async def run(entry: str) -> str:
        if why := cluster.health.quarantined(entry):
            raise RuntimeError(why)
        host = await cluster.host(entry)
        return (await host.arun(ENGINE_INVENTORY, timeout=provisioner.ssh_connect_timeout + 5)).stdout

    return engine, await find_host(list(provisioner.remote_hosts), engine.key, run)


def ensure_script(engine: EnginePlan, argv: list[str], exports: dict[str, str], kernel_id: str, username: str,
                  idle_timeout: float) -> str:  # fmt: skip
    """The shell script (the gateway's SSH account runs it) that starts or joins an engine-account engine as that
    account, expecting kernel `kernel_id` of `username`: the kernel's environment (quoted words), then `sudo -u`."""
    script = posixpath.join(posixpath.dirname(posixpath.dirname(argv[0])), "scripts", "spark_connect.py")
    lines = [f"export {name}={word}" for name, word in exports.items()]
    lines.append('python="${PYSPARK_DRIVER_PYTHON:-${PYSPARK_PYTHON:-python3}}"')
    sudo = ["sudo", "-n", "-u", engine.account, f"--preserve-env={','.join(exports)}", "--"]
    args = ["-s", script, "ensure", "--engine-key", engine.key, "--level", engine.level, "--idle-timeout",
            f"{max(0.0, idle_timeout):g}", "--expect", kernel_id, "--grant", username]  # fmt: skip
    lines.append(f'{shlex.join(sudo)} "$python" {shlex.join(args)} 2>&1')
    return "\n".join(lines) + "\n"


async def start_account_engine(provisioner: Any, request: Any, engine: EnginePlan, entry: str, argv: list[str]) -> None:
    """Start or join `engine` (run as its account) on host `entry` for this kernel (a ProvisionerError says why not)."""
    from .errors import ProvisionerError

    script = ensure_script(engine, argv, request.exports, request.kernel_id, request.username,
                           provisioner.engine_idle_timeout)  # fmt: skip
    host = await provisioner.cluster.host(entry)
    res = await host.arun(script, timeout=provisioner.ssh_connect_timeout + 30)
    if res.status != 0:
        out = (res.stdout + res.stderr).strip()[-2000:]
        raise ProvisionerError(500, f"cannot start the Spark Connect engine {engine.key} as {engine.account} on "
                                    f"{entry} (exit {res.status}): {out}")  # fmt: skip
    provisioner.log.info("Spark Connect engine %s as %s on %s: %s", engine.key, engine.account, entry,
                         res.stdout.strip())  # fmt: skip


async def place_request(provisioner: Any, request: Any, argv: list[str]) -> Any:
    """`request` with its engine's environment, pinned to the engine's host when one runs (400 if refused). An
    engine of the engine account is started (or joined) here, on the host placement picks when none runs."""
    from .errors import ProvisionerError

    try:
        engine, host = await place(provisioner, request, argv)
    except EngineRefused as exc:
        raise ProvisionerError(400, str(exc)) from None
    request.exports.update(engine.exports(provisioner.engine_idle_timeout))
    kernel_tags = shlex.quote(yarn.submit_conf(request.kernel_id, provisioner.yarn_gateway_id))
    if kernel_tags in request.exports.get("SPARK_OPTS", ""):  # YARN: the engine is no kernel's to reconcile
        request.exports["SPARK_OPTS"] = request.exports["SPARK_OPTS"].replace(
            kernel_tags, shlex.quote(yarn_conf(engine))
        )
    if engine.account:
        entry = host or request.pinned or await provisioner._place(None, set())
        await start_account_engine(provisioner, request, engine, entry, argv)
        host = host or entry
    if host is not None and not request.pinned:
        provisioner.log.info("kernel %s joins Spark Connect engine %s on %s", request.kernel_id, engine.key, host)
        return dataclasses.replace(request, pinned=host)
    return request


def check_connect(run: Callable[[str], Any], spark_home: str, python: str) -> tuple[str, str] | None:
    """`ssh-spec check` of a connect-mode spec on a host: Spark ships the Connect server and the kernel's Python
    imports the Connect client. None when fine, else (problem, fix)."""
    if run(f"ls {shlex.quote(spark_home)}/jars/spark-connect_*.jar >/dev/null 2>&1").status != 0:
        return (f"{spark_home}/jars has no spark-connect_*.jar: this Spark cannot run a Spark Connect server",
                "install Spark 4 (pip's pyspark 4 ships it) at SPARK_HOME")  # fmt: skip
    probe = "import pyspark.sql.connect.session"
    if python and run(f"{shlex.quote(python)} -c {shlex.quote(probe)} 2>&1").status != 0:
        return (f"{python} cannot import pyspark's Spark Connect client (pandas, pyarrow, grpcio, ...)",
                f"{python} -m pip install 'pyspark[connect]'")  # fmt: skip
    return None
