"""Where the launchers and kernelspec templates live: inside the wheel, or at the top of a source checkout."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """`kernel-launchers` or `kernelspecs`, from an installed wheel or the source tree."""
    for base in (_HERE / "data", _HERE.parent):
        if (base / name).is_dir():
            return base / name
    raise FileNotFoundError(f"{name}/ is missing from the spark_gateway installation ({_HERE})")
