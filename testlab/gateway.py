"""The gateway as the lab runs it: its configuration for the lab's hosts, a start request's environment, and the
plain `ssh_python` kernelspec the provisioner tests use."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from traitlets.config import Config

from spark_gateway import specs
from testlab.hostlab import HostLab

USER_ENV = {"KERNEL_USERNAME": "alice"}  # the gateway runs as root here; root is refused by default


def gateway_config(lab: HostLab, **overrides: Any) -> Config:
    """`c.DistributedProvisioner` for the lab's hosts, with `overrides`."""
    cfg = Config()
    cfg.DistributedProvisioner.ssh_config_file = str(lab.ssh_config)
    cfg.DistributedProvisioner.remote_hosts = [h.name for h in lab.hosts]
    cfg.DistributedProvisioner.response_port = 0  # OS-assigned: test loops and parallel runs never collide
    cfg.DistributedProvisioner.host_quarantine = 0.2  # a host a test broke is probed again almost at once
    for key, value in overrides.items():
        setattr(cfg.DistributedProvisioner, key, value)
    return cfg


def env(**extra: str) -> dict[str, str]:
    """A start request's environment: ours, a user, an OS-assigned callback port, and `extra`."""
    return {**os.environ, **USER_ENV, "GP_RESPONSE_PORT": "0", **extra}


def write_spec(
    dest: Path,
    *,
    python: str = sys.executable,
    config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    display_name: str = "",
    replace: bool = False,
) -> Path:
    """A plain Python (`ssh_python`) spec at `dest`, run by `python`, with optional extra env and config."""
    dest = Path(os.path.abspath(dest))
    options = specs.SpecOptions(
        kernel_name=dest.name, display_name=display_name, interpreter=python, config=config or {}
    )
    opts, _ = options.resolve()
    path = specs.install(opts, dest, replace)
    if env:
        spec = json.loads((path / "kernel.json").read_text())
        spec["env"].update(env)
        (path / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
    return path
