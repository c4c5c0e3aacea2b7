"""One `remote_hosts` entry as something to run on: local or SSH is decided once, when the `Host` is made.

The provisioner (launches, signals, inventories, cleanups) and `jupyter ssh-spec check/sync` both go through it,
so "this machine without SSH" and "a host over the pooled connection" behave the same everywhere.
"""

from __future__ import annotations

import getpass
import subprocess
from collections.abc import Iterator, Mapping

import paramiko

from .remote import LaunchHandle, LocalLaunch, SshLaunch
from .ssh import CommandResult, SshError, SshPool, is_local, resolve, send_eof


class Host:
    """Runs commands on one host entry: over its pooled SSH connection, or here for a local entry.

    Making one may ask DNS (is the entry this machine's name?): callers on an event loop make it in a thread.
    """

    def __init__(self, entry: str, pool: SshPool) -> None:
        self.entry, self.pool = entry, pool
        self.local = is_local(entry, pool.settings)

    def __repr__(self) -> str:
        return f"Host({self.entry!r}, {'local' if self.local else 'ssh'})"

    # -- blocking (threads, or the ssh-spec commands) --
    def connect(self) -> str:
        """Log in (raises SshError saying what to fix); returns who we are there."""
        if self.local:
            return "this machine: no SSH"
        transport = self.transport()
        return f"{transport.get_username()}@{self.pool.peer_address(self.entry)}"

    def transport(self) -> paramiko.Transport:
        """The pooled connection's transport (SSH hosts only): tunnels and forwards ride on it."""
        transport = self.pool.client(self.entry).get_transport()
        assert transport is not None
        return transport

    def run(self, command: str, stdin: bytes = b"", timeout: float = 30.0) -> CommandResult:
        """Run a command we built (ints and quoted words only) and wait for it."""
        if not self.local:
            return self.pool.run(self.entry, command, stdin, timeout)
        try:
            proc = subprocess.run(["/bin/sh", "-c", command], input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise SshError(f"command did not finish within {timeout:g} s: {command!r}") from exc
        return CommandResult(
            proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        )

    def stream(self, command: str, stdin: bytes, timeout: float) -> Iterator[str]:
        """Start `command`, feed it `stdin`, and yield its output lines as they come."""
        if self.local:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
            assert proc.stdin and proc.stdout
            proc.stdin.write(stdin)
            proc.stdin.close()
            try:
                yield from (line.decode(errors="replace") for line in proc.stdout)
            finally:
                proc.kill()
                proc.wait()
            return
        channel = self.pool.open_session(self.entry, command)
        try:
            channel.settimeout(timeout)
            channel.sendall(stdin)
            send_eof(channel)
            for line in channel.makefile("rb"):
                yield line.decode(errors="replace")
        finally:
            channel.close()

    def gateway_address(self) -> str | None:
        """Our address as this host reaches it (None behind a ProxyJump, where it cannot be told)."""
        return "127.0.0.1" if self.local else self.pool.local_address(self.entry)

    def login(self) -> str:
        """The account commands run as there: the SSH login (ours when the host is this machine)."""
        return getpass.getuser() if self.local else resolve(self.entry, self.pool.settings).user

    def address(self) -> str:
        """The address we reach this host's services (kernel ports, listener) at."""
        return "127.0.0.1" if self.local else self.pool.peer_address(self.entry)

    # -- on the event loop --
    async def arun(self, command: str, timeout: float = 10.0) -> CommandResult:
        return await self.pool.call(self.run, command, b"", timeout)

    async def launch(self, script: str, env: Mapping[str, str] | None) -> LaunchHandle:
        """Start the launch script (`remote.launch_script`); the handle knows the kernel's pid."""
        if self.local:
            return await LocalLaunch.start(script, env)
        return await SshLaunch.start(self.pool, self.entry, script)
