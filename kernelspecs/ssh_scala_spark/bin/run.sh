#!/usr/bin/env bash
# Starts the Scala launcher (Apache Toree under spark-submit, see scripts/launch_toree.sh and docs/scala-kernels.md).
# exec keeps the pid: the launcher starts server_listener.py for it, then execs spark-submit, which execs the JVM.
exec "$(cd "$(dirname "$0")/.." && pwd)/scripts/launch_toree.sh" "$@"
