#!/usr/bin/env bash
# Start an Apache Toree (Scala) kernel on this host and report it to the spark_gateway (see docs/scala-kernels.md).
#
#   launch_toree.sh --kernel-id ID --response-address H:P --public-key B64 [--port-range L..U]
#       [--spark-context-initialization-mode lazy|eager|none] [--ip IP]
#
# No protocol is implemented here: server_listener.py (beside this script) runs with --pid $$. It picks the ports,
# writes the connection file, waits until the kernel listens on them (--wait-for-ports), sends the encrypted
# callback and serves the control listener until the kernel exits. This shell then execs spark-submit, which
# execs the JVM: the pid the gateway signals is the JVM's own; the listener turns the gateway's SIGINT into the
# SIGUSR2 Toree interrupts on (--alternate-sigint USR2).
#
# Nothing here evaluates text: SPARK_OPTS (which holds the client's KERNEL_EXTRA_SPARK_OPTS) is split with
# Python's shlex (as pyspark splits PYSPARK_SUBMIT_ARGS) into separate arguments of spark-submit; LAUNCH_OPTS and
# TOREE_OPTS (operator text) are split on blanks only.
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 1
}

usage="usage: launch_toree.sh --kernel-id ID --response-address HOST:PORT --public-key B64 [--port-range L..U]"
usage+=" [--spark-context-initialization-mode lazy|eager|none] [--ip IP]"
kernel_id="" response="" public_key="" port_range="0..0" mode="none" ip="${GP_KERNEL_IP:-0.0.0.0}"
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || die "unexpected argument '$1'; ${usage}"
  case "$1" in
  --kernel-id) kernel_id="$2" ;;
  --response-address) response="$2" ;;
  --public-key) public_key="$2" ;;
  --port-range) port_range="$2" ;;
  --spark-context-initialization-mode) mode="$2" ;;
  --ip) ip="$2" ;;
  *) die "unexpected argument '$1'; ${usage}" ;;
  esac
  shift 2
done
[ -n "${kernel_id}" ] && [ -n "${response}" ] && [ -n "${public_key}" ] || die "missing arguments; ${usage}"
[[ "${kernel_id}" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "kernel id '${kernel_id}' is not valid (letters, digits, . _ -)"
case "${mode}" in lazy | eager | none) ;; *) die "--spark-context-initialization-mode must be lazy, eager or none, not '${mode}'" ;; esac

host="$(hostname)"
[ -n "${SPARK_HOME:-}" ] || die "SPARK_HOME is not set: set it in the kernelspec's env to a Spark 3.x installation"
[ -d "${SPARK_HOME}" ] || die "SPARK_HOME=${SPARK_HOME} does not exist on ${host}: fix SPARK_HOME in the kernelspec's env"
[ -x "${SPARK_HOME}/bin/spark-submit" ] ||
  die "SPARK_HOME=${SPARK_HOME} has no bin/spark-submit on ${host}: it is not a Spark installation"
# Toree 0.5 is built for Scala 2.12 (Spark 3.x); on another Scala the kernel would die with NoSuchMethodError.
scala_jar="$(cd "${SPARK_HOME}/jars" 2>/dev/null && ls -1 scala-library-*.jar 2>/dev/null | head -n 1)" || true
case "${scala_jar}" in
scala-library-2.12.*) ;;
"") echo "warning: no scala-library-*.jar under ${SPARK_HOME}/jars: cannot check the Scala version" >&2 ;;
*) die "Spark at ${SPARK_HOME} on ${host} uses Scala ${scala_jar#scala-library-} (${scala_jar}); Apache Toree 0.5 needs" \
  "Scala 2.12, i.e. Spark 3.x: point SPARK_HOME at a Spark 3.x installation (see docs/scala-kernels.md)" ;;
esac

PROG_HOME="$(cd "$(dirname "$0")/.." && pwd)"
toree_jar="$(ls -1 "${PROG_HOME}"/lib/toree-assembly-*.jar 2>/dev/null | head -n 1)" || true
[ -n "${toree_jar}" ] || die "no lib/toree-assembly-*.jar in ${PROG_HOME}: reinstall the kernelspec (jupyter ssh-spec install --language Scala)"
listener="${PROG_HOME}/scripts/server_listener.py"
[ -f "${listener}" ] || die "server_listener.py is missing beside $0: reinstall the kernelspec"
python="${GP_LISTENER_PYTHON:-python3}"
command -v "${python}" >/dev/null || die "the listener's Python ${python} (GP_LISTENER_PYTHON) is not found on ${host}:" \
  "install it there (with pycryptodome), or set GP_LISTENER_PYTHON in the kernelspec's env"

# SPARK_OPTS as separate words (NUL-separated), never through a shell.
split='import os, shlex, sys
try:
    words = shlex.split(os.environ.get("SPARK_OPTS", ""))
except ValueError as exc:
    sys.exit(f"error: SPARK_OPTS cannot be split like a command line ({exc}): fix the kernelspec'"'"'s SPARK_OPTS")
sys.stdout.write("".join(w + "\0" for w in words))'
spark_opts=()
words="$(mktemp)"
"${python}" -s -c "${split}" </dev/null >"${words}" || { rm -f "${words}"; exit 1; } # stdin: the token's
mapfile -d '' -t spark_opts <"${words}"
rm -f "${words}"
read -r -a launch_opts <<<"${LAUNCH_OPTS:-}"
# The listener sends interrupts as SIGUSR2: the JVM inherits SIGINT ignored (the kernel runs in the background) and
# can then never handle it. Toree must listen for USR2 (the spec's __TOREE_OPTS__ has --alternate-sigint USR2).
read -r -a toree_opts <<<"${TOREE_OPTS:-${__TOREE_OPTS__:---alternate-sigint USR2}}"

# The connection file: $GP_KERNEL_RUNTIME_DIR, else the Jupyter runtime dir (never the gateway's kernel-<id>.json).
runtime="${GP_KERNEL_RUNTIME_DIR:-${JUPYTER_RUNTIME_DIR:-${JUPYTER_DATA_DIR:-${XDG_DATA_HOME:-${HOME}/.local/share}/jupyter}/runtime}}"
mkdir -p -m 0700 "${runtime}" 2>/dev/null || die "cannot create the runtime directory ${runtime}: set GP_KERNEL_RUNTIME_DIR to a writable one"
connection_file="${runtime}/sg-kernel-${kernel_id}.json"
rm -f "${connection_file}" # a stale one of an earlier launch must not be mistaken for ours

# Toree 0.5 interrupts with sparkContext.cancelAllJobs(): with no SparkContext yet (lazy or none mode) its signal
# handler would create one on a thread without a class loader, which fails and leaves Spark unusable in this kernel
# for good (NoClassDefFoundError: org.apache.spark.package$). So interrupts are relayed only while the context's
# DAG scheduler thread runs; before that the gateway is told why, and the cell runs on.
refusal="Apache Toree 0.5 cannot interrupt a Scala kernel before its SparkContext exists (its interrupt would create"
refusal+=" one inside a signal handler and break Spark in this kernel for good); the cell was not interrupted: wait"
refusal+=" for it, or restart the kernel"
listener_args=(--kernel-id "${kernel_id}" --response-address "${response}" --public-key "${public_key}"
  --port-range "${port_range}" --connection-file "${connection_file}" --pid "$$" --ip "${ip}" --wait-for-ports
  --interrupt-signal USR2 --interrupt-needs-thread dag-scheduler-event-loop --interrupt-refusal "${refusal}")
# Toree reports nothing about its SparkContext: the listener finds it (thread, then Spark UI) for the gateway's `info`
[ "${mode}" = none ] || listener_args+=(--spark-report)
# The listener reads the launch token from our stdin (the gateway writes it there; it is never in an environment)
# and is not dumpable; -s: no .pth file of the user's site dir runs in it. Nothing after it gets that stdin.
"${python}" -s "${listener}" "${listener_args[@]}" <&0 >&2 &
listener_pid=$!
exec </dev/null
while [ ! -f "${connection_file}" ]; do # written complete (renamed into place)
  kill -0 "${listener_pid}" 2>/dev/null ||
    die "server_listener.py (pid ${listener_pid}) exited before writing ${connection_file}; its messages are above"
  sleep 0.02
done

echo "Starting the Scala kernel (Apache Toree, ${mode} Spark context; ${SPARK_OPTS:-no SPARK_OPTS}) as $(id -un) on ${host}" >&2
# Java 17: Toree 0.5 opens java.util.jar reflectively. JDK_JAVA_OPTIONS adds to, never replaces, the user's options.
export JDK_JAVA_OPTIONS="${JDK_JAVA_OPTIONS:+${JDK_JAVA_OPTIONS} }--add-opens=java.base/java.util.jar=ALL-UNNAMED"
exec "${SPARK_HOME}/bin/spark-submit" "${spark_opts[@]}" --class org.apache.toree.Main "${toree_jar}" \
  --profile "${connection_file}" --spark-context-initialization-mode "${mode}" "${toree_opts[@]}" "${launch_opts[@]}"
