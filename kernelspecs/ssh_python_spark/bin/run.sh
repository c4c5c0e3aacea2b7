#!/usr/bin/env bash
# Starts the Python launcher as a Spark driver (YARN client mode, standalone or local: SPARK_OPTS's --master).
#
# Nothing here evaluates text: SPARK_OPTS (which holds the client's KERNEL_EXTRA_SPARK_OPTS) goes to pyspark in
# PYSPARK_SUBMIT_ARGS, which pyspark splits with shlex and hands to $SPARK_HOME/bin/spark-submit without a shell,
# when the launcher creates the SparkSession (before it reports ready in eager mode, in the background in lazy
# mode, so no JVM start sits in front of a lazy kernel). LAUNCH_OPTS (operator text) is split on blanks only.
# Impersonation is the gateway's: it runs this script under `sudo -u`, or adds --proxy-user to SPARK_OPTS (YARN).
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 1
}

[ -n "${SPARK_HOME:-}" ] || die "SPARK_HOME is not set: set it in the kernelspec's env to a Spark installation"
[ -d "${SPARK_HOME}" ] || die "SPARK_HOME=${SPARK_HOME} does not exist on $(hostname): fix SPARK_HOME in the kernelspec's env"
[ -x "${SPARK_HOME}/bin/spark-submit" ] ||
  die "SPARK_HOME=${SPARK_HOME} has no bin/spark-submit on $(hostname): it is not a Spark installation"

python="${PYSPARK_DRIVER_PYTHON:-${PYSPARK_PYTHON:-python3}}"
command -v "${python}" >/dev/null || die "the kernel's Python ${python} (PYSPARK_PYTHON) is not found on $(hostname)"

PROG_HOME="$(cd "$(dirname "$0")/.." && pwd)"
export PYSPARK_SUBMIT_ARGS="${SPARK_OPTS:-} pyspark-shell"
read -r -a launch_opts <<<"${LAUNCH_OPTS:-}"

echo "Starting the Python kernel for Spark (${SPARK_OPTS:-no SPARK_OPTS}) as $(id -un) on $(hostname)" >&2
# -s: no .pth file of the user's site dir runs before the launcher has called back (it adds that dir after)
exec "${python}" -s "${PROG_HOME}/scripts/launch_ipykernel.py" "${launch_opts[@]}" "$@"
