"""Host health: quarantine with backoff after a failure, and cleanups owed to hosts that could not be reached."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class HostState:
    failures: int = 0
    reason: str = ""
    until: float = 0.0  # monotonic time the quarantine ends


@dataclass
class Health:
    """Per-process view of which hosts failed, why, and until when they are left alone."""

    ceiling: float = 300.0
    hosts: dict[str, HostState] = field(default_factory=dict)
    owed: dict[str, list[str]] = field(default_factory=dict)  # host -> shell commands still to run there

    def failed(self, host: str, reason: str, base: float) -> float:
        """Quarantine `host`: 1, 2, 4, ... times `base` seconds (the caller's host_quarantine), at most `ceiling`.
        Returns the duration."""
        state = self.hosts.setdefault(host, HostState())
        state.failures += 1
        state.reason = reason
        duration = min(base * 2 ** (state.failures - 1), self.ceiling)
        state.until = time.monotonic() + duration
        return duration

    def recovered(self, host: str) -> None:
        self.hosts.pop(host, None)

    def quarantined(self, host: str) -> str | None:
        """Why `host` is not to be used right now, or None."""
        state = self.hosts.get(host)
        if state and time.monotonic() < state.until:
            return f"{state.reason} (quarantined for another {state.until - time.monotonic():.0f} s)"
        return None

    def suspect(self, host: str) -> bool:
        """The host failed before and must be probed before it takes a kernel."""
        return host in self.hosts

    def owe(self, host: str, command: str) -> None:
        """Remember a cleanup that could not reach `host`; it runs when the host answers again."""
        self.owed.setdefault(host, []).append(command)

    def take_owed(self, host: str) -> list[str]:
        return self.owed.pop(host, [])
