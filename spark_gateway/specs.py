"""Kernelspec directories built from the templates in `kernelspecs/` and the launchers in `kernel-launchers/`.

One source of truth for `jupyter ssh-spec`, `make specs` and the tests.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .resources import data_dir

PYTHON_LAUNCHERS = ("python/scripts/launch_ipykernel.py", "shared/scripts/server_listener.py")


def kernel_json(template: str, install_dir: Path, python: str, config: dict[str, Any] | None = None) -> dict:
    """The template's kernel.json with paths pointing into `install_dir` and the interpreter made absolute."""
    spec = json.loads((data_dir("kernelspecs") / template / "kernel.json").read_text())
    spec["argv"] = [a.replace("{resource_dir}", str(install_dir)) for a in spec["argv"]]
    if spec["argv"][0] == "python":
        spec["argv"][0] = python
    if config:
        spec["metadata"]["kernel_provisioner"].setdefault("config", {}).update(config)
    return spec


def write_spec(
    dest: Path,
    template: str = "ssh_python",
    *,
    python: str = sys.executable,
    config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    display_name: str | None = None,
    replace: bool = False,
) -> Path:
    """Write a complete kernelspec directory at `dest` atomically (built aside, then renamed into place)."""
    dest = Path(dest).resolve()
    if dest.exists() and not replace:
        raise FileExistsError(f"kernelspec {dest} already exists (use --replace to overwrite it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        spec = kernel_json(template, dest, python, config)
        if env:
            spec["env"].update(env)
        if display_name:
            spec["display_name"] = display_name
        (work / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        for logo in (data_dir("kernelspecs") / template).glob("logo-*"):
            shutil.copy2(logo, work / logo.name)
        (work / "scripts").mkdir()
        for rel in PYTHON_LAUNCHERS:
            shutil.copy2(data_dir("kernel-launchers") / rel, work / "scripts" / Path(rel).name)
        work.chmod(0o755)
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            dest.rename(old)
        work.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dest
