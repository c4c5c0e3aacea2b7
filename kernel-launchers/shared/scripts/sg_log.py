"""Where the host-side modules log: a duplicate of the original stderr, never the user's root logger."""

from __future__ import annotations

import logging
import os


def configure_logging(*names: str) -> None:
    """Send our loggers (not the root logger: that one belongs to the user's code in the kernel) to a duplicate of
    the current stderr, so a kernel capturing fd 2 does not forward our logs to the notebook."""
    handler = logging.StreamHandler(os.fdopen(os.dup(2), "w", buffering=1))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("server_listener", *names):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
