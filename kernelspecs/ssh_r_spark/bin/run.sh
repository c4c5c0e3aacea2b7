#!/usr/bin/env bash
# Starts the R launcher as a SparkR driver (YARN client mode, standalone or local: SPARK_OPTS's --master).
#
# Nothing here evaluates text. SparkR starts spark-submit through a shell (system2), with SPARKR_SUBMIT_ARGS on
# its command line, so SPARK_OPTS (which holds the client's KERNEL_EXTRA_SPARK_OPTS) is split with Python's shlex,
# as pyspark splits PYSPARK_SUBMIT_ARGS, and each word is quoted again (shlex.join) for that shell: it gets data,
# never code. LAUNCH_OPTS (operator text) is split on blanks only. SparkR is checked here, before R starts.
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 1
}

host="$(hostname)"
[ -n "${SPARK_HOME:-}" ] || die "SPARK_HOME is not set: set it in the kernelspec's env to a Spark installation"
[ -d "${SPARK_HOME}" ] ||
  die "SPARK_HOME=${SPARK_HOME} does not exist on ${host}: fix SPARK_HOME in the kernelspec's env"
[ -x "${SPARK_HOME}/bin/spark-submit" ] ||
  die "SPARK_HOME=${SPARK_HOME} has no bin/spark-submit on ${host}: it is not a Spark installation"
[ -f "${SPARK_HOME}/R/lib/SparkR/DESCRIPTION" ] ||
  die "SparkR is not installed under ${SPARK_HOME}/R/lib on ${host}: install a Spark distribution with R support" \
    "(spark.apache.org's spark-<version>-bin-*.tgz ships R/lib/SparkR; pip's pyspark does not), see docs/r-kernels.md"

rscript="${GP_RSCRIPT:-Rscript}"
command -v "${rscript}" >/dev/null || die "the kernel's Rscript ${rscript} (GP_RSCRIPT) is not found on ${host}"
python="${GP_LISTENER_PYTHON:-python3}"
command -v "${python}" >/dev/null || die "the listener's Python ${python} (GP_LISTENER_PYTHON) is not found on ${host}"

split='import os, shlex, sys
try:
    print(shlex.join(shlex.split(os.environ.get("SPARK_OPTS", ""))))
except ValueError as exc:
    sys.exit(f"error: SPARK_OPTS cannot be split like a command line ({exc}): fix the kernelspec'"'"'s SPARK_OPTS")'
words="$("${python}" -s -c "${split}" </dev/null)" || exit 1 # stdin holds the launch token: for the listener
export SPARKR_SUBMIT_ARGS="${words} sparkr-shell"
PROG_HOME="$(cd "$(dirname "$0")/.." && pwd)"
read -r -a launch_opts <<<"${LAUNCH_OPTS:-}"

echo "Starting the R kernel for Spark (${SPARK_OPTS:-no SPARK_OPTS}) as $(id -un) on ${host}" >&2
# No user file runs before the launcher has passed its stdin (the launch token) to the listener: the launcher reads
# them afterwards (see docs/r-kernels.md).
exec "${rscript}" --no-init-file --no-environ "${PROG_HOME}/scripts/launch_IRkernel.R" "${launch_opts[@]}" "$@"
