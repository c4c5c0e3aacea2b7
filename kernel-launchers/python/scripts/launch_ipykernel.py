"""Start an ipykernel on this host and report its connection info to the spark_gateway (see docs/design.md).

Order: the kernel class (and ipykernel) is imported first, so that a broken environment ends the launch before it
reports success and the gateway fails the start at once with the log tail; then ports, connection file, control
listener and the callback; the kernel binds right after (ZMQ clients retry until it does).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import signal
import sys
from pathlib import Path
from types import FrameType

_HERE = Path(__file__).resolve().parent
if not (_HERE / "server_listener.py").exists():  # running from a source checkout
    sys.path.insert(0, str(_HERE.parent.parent / "shared" / "scripts"))

import server_listener as sl  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="spark_gateway ipykernel launcher")
    parser.add_argument("--kernel-id", required=True)
    parser.add_argument("--port-range", default="0..0")
    parser.add_argument("--response-address", required=True)
    parser.add_argument("--public-key", required=True)
    parser.add_argument("--kernel-class-name", default="ipykernel.ipkernel.IPythonKernel")
    parser.add_argument("--spark-context-initialization-mode", choices=("lazy", "eager", "none"), default="none")
    parser.add_argument("--ip", default="0.0.0.0")
    return parser.parse_args(argv)


def connection_file_path(kernel_id: str) -> Path:
    """``kernel-<id>.json`` in $GP_KERNEL_RUNTIME_DIR, else the Jupyter runtime dir."""
    runtime_dir = os.environ.get("GP_KERNEL_RUNTIME_DIR")
    if not runtime_dir:
        from jupyter_core.paths import jupyter_runtime_dir

        runtime_dir = jupyter_runtime_dir()
    path = Path(runtime_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path / f"kernel-{kernel_id}.json"


def remove_on_exit(path: Path) -> None:
    """Remove ``path`` at interpreter exit and on SIGTERM (which then still terminates the process)."""
    atexit.register(sl.remove_file, str(path))

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        sl.remove_file(str(path))
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def import_kernel_class(name: str) -> type:
    """Import ``package.module.Class`` (an ipykernel Kernel subclass); exit 1 with a clear message if that fails."""
    from ipykernel.kernelbase import Kernel

    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        sys.exit(f"error: cannot import kernel class {name!r}: {exc!r}")
    if not (isinstance(cls, type) and issubclass(cls, Kernel)):
        sys.exit(f"error: kernel class {name!r} is not a subclass of ipykernel.kernelbase.Kernel")
    return cls


# ------------------------------------------------------------------------------------------------
# SPARK INITIALIZATION: not implemented yet (someone implements lazy/eager Spark context creation here).
# ------------------------------------------------------------------------------------------------
def initialize_spark(mode: str) -> None:
    """Create the Spark context ('eager') or arrange to create it on first use ('lazy')."""
    raise NotImplementedError(f"--spark-context-initialization-mode {mode} is not implemented yet; use 'none'")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    token = sl.take_launch_token()
    sl.configure_logging()
    sender = sl.CallbackSender(args.response_address, args.public_key, args.kernel_id, token)

    # Import errors and bad kernel classes must kill the launch before it reports success: the gateway then
    # fails the start at once with this process's exit status and log tail.
    kernel_class = import_kernel_class(args.kernel_class_name)
    from ipykernel.kernelapp import IPKernelApp

    pid, pgid = os.getpid(), os.getpgid(0)
    ports = sl.select_ports(args.port_range, len(sl.KERNEL_PORT_NAMES) + 1, args.ip)
    info = sl.build_connection_info(ports[:-1], args.ip)
    path = connection_file_path(args.kernel_id)
    remove_on_exit(path)
    sl.write_connection_file(str(path), info)
    listener = sl.ControlListener(pid, pgid, port=ports[-1], ip=args.ip)
    listener.start()

    fields = sl.payload_fields(args.kernel_id, info, pid, pgid, listener, str(path))
    try:
        sender.send(fields)
    except sl.CallbackError as exc:
        sys.exit(f"error: {exc}")

    if args.spark_context_initialization_mode != "none":
        initialize_spark(args.spark_context_initialization_mode)

    # The app ignores SIGINT except while a cell runs, where SIGINT raises KeyboardInterrupt.
    IPKernelApp.launch_instance(argv=["-f", str(path)], kernel_class=kernel_class)


if __name__ == "__main__":
    main()
