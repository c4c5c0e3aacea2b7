"""The standalone listener: the remote side of the callback and control protocols for launchers in other languages.

The host side is one module per concern, all beside this script in every kernelspec (stdlib + pycryptodome):
`sg_protocol` (the wire protocol, shared with the gateway), `sg_ports` (ports and the connection file),
`sg_callback` (the launch token and the encrypted callback), `sg_control` (the authenticated control listener),
`sg_procinfo` (/proc inspection), `sg_reports` (what the `info` op serves), `sg_log`. The Python launcher imports
them in its own process; the R and Scala launchers run this script:

    server_listener.py --kernel-id ID --response-address H:P --public-key B64 --port-range R \
        --connection-file PATH --pid PID [--ip IP] [--info-file PATH] [--wait-for-ports] [--interrupt-signal SIG]
        [--interrupt-needs-thread NAME --interrupt-refusal TEXT] [--spark-report]
                                    (reads the launch token from stdin: start it with `python -s`, before any user code)

Standalone, it terminates PID when it cannot do its job (no connection file, no callback): a kernel the gateway
cannot reach must not linger, and the launcher's exit makes the gateway fail the start at once with the log tail.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time

import sg_protocol as protocol
from sg_callback import CallbackError, make_undumpable, payload_fields, send_connection_info, take_launch_token, wipe
from sg_control import ControlListener
from sg_log import configure_logging
from sg_ports import build_connection_info, remove_file, select_ports, write_connection_file
from sg_procinfo import pid_alive, thread_guard, wait_for_kernel_ports
from sg_reports import FileReport, JvmSparkReport, PolledReport

log = logging.getLogger("server_listener")

KERNEL_PORT_NAMES = protocol.PORT_NAMES


def main(argv: list[str] | None = None) -> int:
    """Write the connection file, call back with PID's details, serve control until PID exits."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-id", required=True)
    parser.add_argument("--response-address", required=True)
    parser.add_argument("--public-key", required=True)
    parser.add_argument("--port-range", default="0..0")
    parser.add_argument("--connection-file", required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--ip", default=os.environ.get("GP_KERNEL_IP", "0.0.0.0"))
    info = parser.add_mutually_exclusive_group()
    info.add_argument("--info-file", help="JSON object served by the `info` op (the launcher keeps it current)")
    info.add_argument(
        "--spark-report",
        action="store_true",
        help="serve PID's SparkContext as the `info` op's report, found by its thread and Spark UI (JVM kernels)",
    )
    parser.add_argument(
        "--interrupt-signal",
        type=lambda name: signal.Signals[name if name.startswith("SIG") else f"SIG{name}"],
        help="send SIGINT requests for PID as this signal (e.g. USR2)",
    )
    parser.add_argument(
        "--interrupt-needs-thread",
        metavar="NAME",
        help="refuse SIGINT requests while PID has no thread named NAME (with --interrupt-refusal as the reason)",
    )
    parser.add_argument("--interrupt-refusal", default="the kernel cannot be interrupted yet", metavar="TEXT")
    parser.add_argument(
        "--wait-for-ports",
        action="store_true",
        help="call back only once PID's kernel listens on the connection file's ports (no time limit: the "
        "gateway's launch timeout applies)",
    )
    args = parser.parse_args(argv)
    token = take_launch_token()
    make_undumpable()  # the kernel runs as our user: it must not read the token from our memory
    configure_logging()
    # SIGTERM (e.g. the `shutdown` op to the group we are in) ends us through `finally`: the files go too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    listener = None
    try:
        pgid = os.getpgid(args.pid)
        ports = select_ports(args.port_range, len(KERNEL_PORT_NAMES) + 1, args.ip)
        info = build_connection_info(ports[:-1], args.ip)
        write_connection_file(args.connection_file, info)
        report: PolledReport | None = None
        if args.info_file:
            report = FileReport(args.info_file)
        elif args.spark_report:
            report = JvmSparkReport(args.pid, ports[:-1])
        needs = args.interrupt_needs_thread
        guard = thread_guard(args.pid, needs, args.interrupt_refusal) if needs else None
        listener = ControlListener(
            args.pid, pgid, port=ports[-1], ip=args.ip, info=report, interrupt_signal=args.interrupt_signal,
            interrupt_guard=guard,
        )  # fmt: skip
        listener.start()
        if args.wait_for_ports:
            wait_for_kernel_ports(args.pid, ports[:-1])
        fields = payload_fields(args.kernel_id, info, args.pid, pgid, listener, args.connection_file)
        send_connection_info(args.response_address, args.public_key, args.kernel_id, token.decode(), fields)
        wipe(token)
    except Exception as exc:  # noqa: BLE001 (logged; the kernel is ended, see the module docstring)
        log.error("error: %s; terminating process %d", exc if isinstance(exc, CallbackError) else repr(exc), args.pid)
        with contextlib.suppress(OSError):
            os.kill(args.pid, signal.SIGTERM)
        return 1
    else:
        log.info("connection info sent for kernel %s; serving control on port %d", args.kernel_id, listener.port)
        while pid_alive(args.pid):
            time.sleep(0.2)
        log.info("process %d exited; listener stops", args.pid)
        return 0
    finally:
        if listener is not None:
            listener.stop()
        for path in (args.connection_file, args.info_file):
            if path:
                remove_file(path)


if __name__ == "__main__":
    sys.exit(main())
