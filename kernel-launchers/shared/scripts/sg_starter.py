"""What every starter of a kernel's Spark objects shares (the launcher's SparkSessionStarter, spark_connect's
ConnectStarter): a state ``starting`` -> ``ready`` or ``failed`` that threads wait on, and the control listener's
``info`` view of it."""

from __future__ import annotations

import threading
from typing import Any

from sg_protocol import INFO_MAX_WAIT


class StartState:
    """``state``, ``error``, ``session`` and ``details``, changed under one condition that `wait` and `info` use."""

    def __init__(self) -> None:
        self.state, self.error = "starting", ""
        self.session: Any = None
        self.details: dict[str, Any] = {}
        self._changed = threading.Condition()

    def _finish(self, state: str, **fields: Any) -> None:
        """Set `fields` (attributes) and the new `state`; wake every waiter."""
        with self._changed:
            for name, value in fields.items():
                setattr(self, name, value)
            self.state = state
            self._changed.notify_all()

    def wait(self) -> None:
        """Block until the state is no longer ``starting`` (interruptible)."""
        with self._changed:
            while self.state == "starting":
                self._changed.wait(0.5)

    def info(self, wait: float = 0.0) -> dict[str, Any]:
        """What the control listener's `info` op returns; waits up to `wait` s while starting."""
        with self._changed:
            if self.state == "starting" and wait > 0:
                self._changed.wait(min(float(wait), INFO_MAX_WAIT))
            return {"spark": {"state": self.state, "error": self.error or None, **self.details}}
