"""The launch script, and running it on a host: locally, or over the pooled SSH connection.

The script goes to `/bin/sh -s` on stdin, so no value appears in any process's argv, and every value in it is
single-quoted: client text is data, never code.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

import paramiko

from .ssh import SshPool, close_quietly, send_eof

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# $NAME, ${NAME} and ${NAME:-default} in kernelspec env values (operator text, as in the seed's examples)
_REFERENCE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)
SHELL = "/bin/sh -s"
TOKEN = re.compile(r"[0-9a-f]{64}\Z")
HEREDOC_END = "SG_LAUNCH_TOKEN_END"  # the here-document delimiter
TAIL_LINES = 30


class LaunchScriptError(ValueError):
    """An environment name or value cannot be passed to a kernel."""


def check_env(name: str, value: str) -> None:
    """Refuse what no environment can hold, naming the variable."""
    if not ENV_NAME.match(name):
        raise LaunchScriptError(f"environment variable name {name!r} is not valid (letters, digits and _ only)")
    if "\0" in value:
        raise LaunchScriptError(f"environment variable {name} contains a NUL byte, which no environment can hold")


def spec_value(template: str, values: Mapping[str, str]) -> str:
    """Render a kernelspec env value as one shell word.

    References to variables we send (`KERNEL_ID`, client `KERNEL_*` values, ...) are replaced by their values,
    quoted; references to anything else (`${HOME}`) are left to the host's shell as plain parameter expansion.
    Nothing else in the template, and nothing in any value, is interpreted.
    """
    parts, pos = [], 0
    for m in _REFERENCE.finditer(template):
        parts.append(shlex.quote(template[pos : m.start()]) if m.start() > pos else "")
        name = m["braced"] or m["plain"]
        if name in values:
            parts.append(shlex.quote(values[name]))
        elif m["default"] is not None:
            parts.append(shlex.quote(m["default"]))
        else:
            parts.append(f'"${{{name}}}"')
        pos = m.end()
    parts.append(shlex.quote(template[pos:]) if pos < len(template) or not parts else "")
    return "".join(parts)


def launch_script(
    argv: list[str],
    exports: Mapping[str, str],
    log_file: str,
    workdir: str | None = None,
    run_as: str | None = None,
    private_log_dir: bool = False,
    token: str | None = None,
) -> str:
    """The script that starts the kernel detached (own session) and reports its pid, exit status and log tail.

    `exports` maps names to shell words (already quoted, see `spec_value`); `run_as` runs the kernel under
    `sudo -u` with that environment. The log is never opened through a symlink or another user's file (see
    `log_lines`); with `private_log_dir` its directory must be ours and is made 0700. The launch `token` goes to
    the kernel's stdin (`token_stdin`), never into an environment or argv.
    """
    lines = [f"export {name}={word}" for name, word in exports.items()]
    if workdir:
        lines.append(f"cd {shlex.quote(workdir)} || exit 97")
    log = shlex.quote(log_file)
    command = " ".join(shlex.quote(a) for a in argv)
    if run_as:
        keep = ",".join(exports)
        command = f"sudo -n -u {shlex.quote(run_as)} --preserve-env={shlex.quote(keep)} -- {command}"
    lines += log_lines(log_file, private_log_dir)
    stdin = token_stdin(token)
    lines += [
        f"setsid {command} {stdin[0]} >&3 2>&3 3>&- &",
        *stdin[1:],
        "exec 3>&-",
        "pid=$!",
        'echo "pid $pid"',
        'wait "$pid"',
        'echo "exit $?"',
        f"tail -n {TAIL_LINES} {log}",
    ]
    return "\n".join(lines) + "\n"


def token_stdin(token: str | None) -> list[str]:
    """The kernel's stdin redirection, and the here-document lines after the command when it carries `token`.

    The script itself travels on the launch shell's stdin, so the token is in no process's environment or argv
    on the way (`sudo` passes stdin through untouched); the launcher reads it first thing (`sg_callback`).
    """
    if token is None:
        return ["< /dev/null"]
    if not TOKEN.match(token):
        raise LaunchScriptError("the launch token must be 64 lowercase hex digits")
    return [f"<<'{HEREDOC_END}'", token, HEREDOC_END]


def log_lines(log_file: str, private_dir: bool) -> list[str]:
    """Shell lines that open the kernel log as fd 3, never through a planted symlink or someone else's file.

    A log file we own, that is no symlink, is appended to (a restart keeps the earlier run's lines; in a sticky
    or private directory nobody else can swap it); anything else at that path makes the launch fail, and a new
    file is created with `set -C` (O_EXCL: a symlink planted there is not followed). The directory is created
    0700 if missing; with `private_dir` it must be a real directory of ours, and is made 0700.
    """
    log, folder = shlex.quote(log_file), shlex.quote(posixpath.dirname(log_file) or "/")
    lines = ["mask=$(umask); umask 077", f"[ -d {folder} ] || mkdir -p -m 700 {folder} 2>/dev/null"]
    if private_dir:
        lines += [
            f"if [ -L {folder} ] || [ ! -d {folder} ] || [ ! -O {folder} ] || ! chmod 700 {folder}; then",
            f"  echo 'the kernel log directory '{folder}' is not a directory of this account (a symlink or another"
            " user'\\''s): remove it, or set GP_KERNEL_LOG_DIR' >&2; exit 98",
            "fi",
        ]
    lines += [
        f"if [ -f {log} ] && [ ! -L {log} ] && [ -O {log} ]; then command exec 3>> {log}",
        f"else set -C; command exec 3> {log}",
        "fi",
        'opened=$?; set +C; umask "$mask"',
        f"[ \"$opened\" = 0 ] || {{ echo 'cannot create the kernel log '{log}' (a file or symlink of another user"
        " there is never followed)' >&2; exit 98; }",
    ]
    return lines


@dataclass
class LaunchOutcome:
    """What the launch shell reported after the kernel process ended."""

    status: int | None
    tail: str


class LaunchHandle:
    """A started launch script: the kernel's pid now, its exit status and log tail if it dies."""

    pid: int

    async def exited(self) -> LaunchOutcome:
        raise NotImplementedError

    def detach(self) -> None:
        """Stop watching; the kernel keeps running."""


def _parse_outcome(rest: str, stderr: str) -> LaunchOutcome:
    status, tail = None, rest
    first, _, after = rest.partition("\n")
    if first.startswith("exit "):
        status, tail = int(first.split()[1]), after
    return LaunchOutcome(status, (tail + stderr).strip())


class LocalLaunch(LaunchHandle):
    """The script run by a local `/bin/sh` (the embedded default: no SSH)."""

    def __init__(self, proc: asyncio.subprocess.Process, pid: int) -> None:
        self.proc, self.pid = proc, pid

    @classmethod
    async def start(cls, script: str, env: Mapping[str, str] | None) -> LocalLaunch:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-s",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        assert proc.stdin and proc.stdout
        proc.stdin.write(script.encode())
        proc.stdin.close()
        first = (await proc.stdout.readline()).decode()
        if not first.startswith("pid "):
            err = (await proc.stderr.read()).decode() if proc.stderr else ""
            await proc.wait()
            raise OSError(f"the launch shell failed (exit {proc.returncode}): {(first + err).strip()}")
        return cls(proc, int(first.split()[1]))

    async def exited(self) -> LaunchOutcome:
        assert self.proc.stdout and self.proc.stderr
        out, err = await asyncio.gather(self.proc.stdout.read(), self.proc.stderr.read())
        await self.proc.wait()
        return _parse_outcome(out.decode(errors="replace"), err.decode(errors="replace"))

    def detach(self) -> None:
        # Only the waiting shell goes; the kernel has its own session and keeps running.
        if self.proc.returncode is None:
            self.proc.kill()


class SshLaunch(LaunchHandle):
    """The script run by `/bin/sh -s` on a channel of the pooled SSH connection."""

    def __init__(self, pool: SshPool, channel: paramiko.Channel, pid: int, rest: bytes) -> None:
        self.pool, self.channel, self.pid, self._rest = pool, channel, pid, rest

    @classmethod
    async def start(cls, pool: SshPool, entry: str, script: str) -> SshLaunch:
        def begin() -> tuple[paramiko.Channel, int, bytes]:
            channel = pool.open_session(entry, SHELL)
            try:
                return started(channel)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                close_quietly(channel)
                raise OSError(f"SSH to {entry} broke while starting the kernel: {exc or type(exc).__name__}") from exc

        def started(channel: paramiko.Channel) -> tuple[paramiko.Channel, int, bytes]:
            channel.sendall(script.encode())
            send_eof(channel)
            buf = b""
            while b"\n" not in buf:
                data = channel.recv(4096)
                if not data:
                    err = _read_all(channel.recv_stderr)
                    status = channel.recv_exit_status()
                    close_quietly(channel)
                    raise OSError(f"the launch shell on {entry} failed (exit {status}): {(buf + err).decode().strip()}")
                buf += data
            first, _, rest = buf.partition(b"\n")
            if not first.startswith(b"pid "):
                close_quietly(channel)
                raise OSError(f"unexpected output from the launch shell on {entry}: {first.decode()!r}")
            return channel, int(first.split()[1]), rest

        return cls(pool, *await pool.call(begin))

    async def exited(self) -> LaunchOutcome:
        def drain() -> LaunchOutcome:
            out = self._rest + _read_all(self.channel.recv)
            err = _read_all(self.channel.recv_stderr)
            return _parse_outcome(out.decode(errors="replace"), err.decode(errors="replace"))

        return await self.pool.call(drain)

    def detach(self) -> None:
        close_quietly(self.channel)


def _read_all(recv: object) -> bytes:
    buf = bytearray()
    while True:
        try:
            data = recv(65536)  # type: ignore[operator]
        except OSError:
            break
        if not data:
            break
        buf += data
    return bytes(buf)
