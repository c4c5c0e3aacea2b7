# Start IRkernel on this host and report its connection info to the spark_gateway (see docs/r-kernels.md).
#
#   Rscript launch_IRkernel.R --kernel-id ID --response-address H:P --public-key B64 [--port-range L..U]
#       [--spark-context-initialization-mode lazy|eager|none] [--ip IP]
#
# The protocols are not re-implemented in R: server_listener.py (beside this script) runs as a separate Python
# process with --pid <this R process>. It picks the ports, writes the connection file, sends the encrypted callback
# and serves the control listener until this process exits. This process then becomes the kernel
# (IRkernel::main), so the pid the gateway signals is R's own and SIGINT interrupts R code.
#
# Order (main): the listener is started first, with base R only, and takes the launch token from our stdin; only
# then do the user's files run (Rscript is started with --no-environ --no-init-file: this script reads them, see
# read_startup_files), then IRkernel (and SparkR) are checked and eager mode creates the SparkSession. The listener
# calls back once IRkernel listens, so a broken host fails the start at once with this log's last lines. The
# listener's Python is $GP_LISTENER_PYTHON (the spec tooling writes an absolute path), else python3 on PATH.

fail <- function(...) {
  # One line on stderr (the kernel log, whose tail the gateway puts in the start error), then exit 1.
  message("error: ", ...)
  quit(save = "no", status = 1)
}

say <- function(...) message(format(Sys.time(), "%Y-%m-%d %H:%M:%S"), " launch_IRkernel INFO ", ...)

USAGE <- paste(
  "usage: launch_IRkernel.R --kernel-id ID --response-address HOST:PORT --public-key B64 [--port-range L..U]",
  "[--spark-context-initialization-mode lazy|eager|none] [--ip IP]"
)

parse_args <- function(argv) {
  opts <- list("port-range" = "0..0", "spark-context-initialization-mode" = "none")
  known <- c("kernel-id", "response-address", "public-key", "port-range", "spark-context-initialization-mode", "ip")
  i <- 1
  while (i <= length(argv)) {
    name <- sub("^--", "", argv[[i]])
    if (!startsWith(argv[[i]], "--") || !(name %in% known) || i == length(argv)) {
      fail("unexpected argument '", argv[[i]], "'; ", USAGE)
    }
    opts[[name]] <- argv[[i + 1]]
    i <- i + 2
  }
  for (name in c("kernel-id", "response-address", "public-key")) {
    if (is.null(opts[[name]])) fail("--", name, " is required; ", USAGE)
  }
  if (!grepl("^[A-Za-z0-9][A-Za-z0-9._-]*$", opts[["kernel-id"]])) {
    fail("kernel id '", opts[["kernel-id"]], "' is not valid (letters, digits, . _ -)")
  }
  if (!(opts[["spark-context-initialization-mode"]] %in% c("lazy", "eager", "none"))) {
    fail("--spark-context-initialization-mode must be lazy, eager or none, not '",
         opts[["spark-context-initialization-mode"]], "'")
  }
  opts
}

this_script <- function() {
  # Rscript passes the script to R as --file=PATH.
  normalizePath(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE)[[1]]))
}

listener_script <- function() {
  here <- dirname(this_script())
  candidates <- c(file.path(here, "server_listener.py"),  # an installed kernelspec: scripts/ holds both
                  file.path(here, "..", "..", "shared", "scripts", "server_listener.py"))  # a source checkout
  found <- candidates[file.exists(candidates)]
  if (length(found) == 0) fail("server_listener.py is missing beside ", this_script(), ": reinstall the kernelspec")
  normalizePath(found[[1]])
}

listener_python <- function() {
  python <- Sys.getenv("GP_LISTENER_PYTHON", "python3")
  path <- Sys.which(python)
  if (!nzchar(path)) {
    fail("the listener's Python '", python, "' (GP_LISTENER_PYTHON) is not found on ", Sys.info()[["nodename"]],
         ": install it there (with pycryptodome), or set GP_LISTENER_PYTHON in the kernelspec's env")
  }
  unname(path)
}

connection_file_path <- function(kernel_id) {
  # $GP_KERNEL_RUNTIME_DIR, else the Jupyter runtime dir as jupyter_core computes it on Linux. Not
  # `kernel-<id>.json`: that is the gateway's own file for this kernel when both share a filesystem.
  dir <- Sys.getenv("GP_KERNEL_RUNTIME_DIR", Sys.getenv("JUPYTER_RUNTIME_DIR"))
  if (!nzchar(dir)) {
    data <- Sys.getenv("JUPYTER_DATA_DIR")
    if (!nzchar(data)) data <- file.path(Sys.getenv("XDG_DATA_HOME", path.expand("~/.local/share")), "jupyter")
    dir <- file.path(data, "runtime")
  }
  dir.create(dir, recursive = TRUE, mode = "0700", showWarnings = FALSE)
  if (!dir.exists(dir)) {
    fail("cannot create the runtime directory ", dir, ": set GP_KERNEL_RUNTIME_DIR to a writable one")
  }
  file.path(dir, paste0("sg-kernel-", kernel_id, ".json"))
}

process_running <- function(pid) {
  # /proc/PID/stat is "PID (COMMAND) STATE ..."; a zombie (Z) has ended.
  stat <- tryCatch(suppressWarnings(readLines(sprintf("/proc/%d/stat", pid))), error = function(e) "")
  length(stat) == 1 && nzchar(stat) && !grepl("^[0-9]+ \\(.*\\) Z ", stat)
}

start_listener <- function(opts, connection_file, info_file) {
  args <- c(listener_script(), "--kernel-id", opts[["kernel-id"]], "--response-address", opts[["response-address"]],
            "--public-key", opts[["public-key"]], "--port-range", opts[["port-range"]],
            "--connection-file", connection_file, "--pid", Sys.getpid(), "--wait-for-ports")
  if (!is.null(opts[["ip"]])) args <- c(args, "--ip", opts[["ip"]])
  if (!is.null(info_file)) args <- c(args, "--info-file", info_file)
  # system2() runs a shell command line: every word is quoted (shQuote), none is interpreted. The shell starts
  # the listener in the background (stdout to our stderr, the kernel log) and prints its pid. The listener reads
  # the launch token from our stdin, where the gateway writes it (R never reads it; it is in no environment);
  # a background job of sh gets /dev/null as stdin, so fd 0 goes through fd 4. -s: no user .pth file runs there.
  pid <- system2("/bin/sh", c("-c", shQuote('exec 4<&0; "$@" <&4 4<&- >&2 & echo $!'), "sh",
                              shQuote(listener_python()), "-s", shQuote(args)), stdout = TRUE)
  as.integer(pid[[1]])
}

wait_for_connection_file <- function(path, listener_pid) {
  # The listener writes the file, then sends the callback; if it fails, it terminates this process. A listener
  # that dies before writing it (e.g. a Python too old for it) ends the launch here.
  repeat {
    if (file.exists(path)) {  # complete once it parses: the listener writes it in one go
      info <- tryCatch(jsonlite::fromJSON(path), error = function(e) NULL, warning = function(w) NULL)
      if (!is.null(info$hb_port)) return(invisible(info))
    }
    if (!process_running(listener_pid)) {
      fail("server_listener.py (pid ", listener_pid, ") exited before writing ", path, "; its messages are above")
    }
    Sys.sleep(0.02)
  }
}

# ------------------------------------------------------------------------------------------------ Spark
# SparkR starts spark-submit itself, from SPARKR_SUBMIT_ARGS (bin/run.sh builds it from SPARK_OPTS).

at_exit <- new.env()  # its finalizer runs when R exits

write_report <- function(path, spark) {
  # The JSON object served by the listener's `info` op; replaced by rename so it is never read half-written.
  tmp <- paste0(path, ".tmp")
  writeLines(jsonlite::toJSON(list(spark = spark), auto_unbox = TRUE, null = "null"), tmp)
  invisible(file.rename(tmp, path))
}

spark_lib <- function() file.path(Sys.getenv("SPARK_HOME"), "R", "lib")

check_sparkr <- function() {
  if (!requireNamespace("SparkR", lib.loc = spark_lib(), quietly = TRUE)) {
    fail("SparkR is not installed under ", spark_lib(), " on ", Sys.info()[["nodename"]],
         ": install a Spark distribution with R support (see docs/r-kernels.md)")
  }
}

start_spark <- function() {
  # The session, and `spark` and `sc` as the sparkR shell defines them (R/pkg/inst/profile/shell.R in Spark).
  # appName: sparkR.session() would otherwise rename the application (spark-submit's --name) "SparkR".
  started <- Sys.time()
  spark <- SparkR::sparkR.session(appName = Sys.getenv("KERNEL_ID", "SparkR"), enableHiveSupport = FALSE)
  sc <- SparkR:::callJStatic("org.apache.spark.sql.api.r.SQLUtils", "getJavaSparkContext", spark)
  jcall <- SparkR:::callJMethod  # a method of a JVM object (sc is a JavaSparkContext)
  details <- list(state = "ready", error = NULL, app_id = jcall(jcall(sc, "sc"), "applicationId"),
                  app_name = jcall(sc, "appName"), master = jcall(sc, "master"), ui_url = NULL,
                  spark_version = jcall(sc, "version"),
                  seconds = round(as.numeric(difftime(Sys.time(), started, units = "secs")), 3))
  say("SparkSession ready: application ", details$app_id, " (", details$app_name, ") on ", details$master)
  list(spark = spark, sc = sc, details = details)
}

setup_spark <- function(mode, info_file) {
  suppressPackageStartupMessages(library(SparkR, lib.loc = spark_lib()))  # attached: sql(), read.df(), ...
  env <- SparkR:::.sparkREnv
  # At exit, stop the application (FINISHED on the cluster) if a session was created.
  reg.finalizer(at_exit, onexit = TRUE, function(e) {
    created <- exists(".sparkRjsc", envir = env, inherits = FALSE) && !bindingIsActive(".sparkRjsc", env)
    if (created) try(SparkR::sparkR.session.stop())
  })
  if (mode == "eager") {
    made <- tryCatch(start_spark(), error = function(e) {
      fail("cannot create the SparkSession (eager mode): ", conditionMessage(e))
    })
    assign("spark", made$spark, envir = globalenv())
    assign("sc", made$sc, envir = globalenv())
    write_report(info_file, made$details)
    return(invisible())
  }
  # lazy: R has no background thread to create the session in, so it is created on first use, from any cell
  # that uses `spark`, `sc` or a SparkR function needing the session (those look for .sparkRsession and
  # .sparkRjsc in SparkR's environment: active bindings there create the session when first read).
  write_report(info_file, list(state = "starting", error = NULL))
  create_on_first_use <- function() {
    rm(list = c(".sparkRsession", ".sparkRjsc"), envir = env)  # sparkR.session() must not find the bindings
    made <- tryCatch(start_spark(), error = function(e) {
      write_report(info_file, list(state = "failed", error = conditionMessage(e)))
      try(SparkR::sparkR.session.stop(), silent = TRUE)  # the JVM of the failed start, if any
      install_bindings()  # the next use tries again
      stop("cannot create the SparkSession: ", conditionMessage(e), call. = FALSE)
    })
    write_report(info_file, made$details)
  }
  install_bindings <- function() {
    for (name in c(".sparkRsession", ".sparkRjsc")) {
      local({
        binding <- name
        makeActiveBinding(binding, function() {
          create_on_first_use()
          get(binding, envir = env)
        }, env)
      })
    }
  }
  install_bindings()
  # Promises: evaluated on first use, and users may still assign their own `spark` (spark <- sparkR.session()).
  delayedAssign("spark", get(".sparkRsession", envir = env), assign.env = globalenv())
  delayedAssign("sc", SparkR:::callJStatic("org.apache.spark.sql.api.r.SQLUtils", "getJavaSparkContext", spark),
                assign.env = globalenv())
}

# ------------------------------------------------------------------------------------------------ main
wait_for_token_taken <- function(path, listener_pid) {
  # The listener reads the token from stdin before it writes the connection file: once the file exists, R's
  # stdin is drained, so user code may run. Base R only: no package is loaded before this returns.
  while (!file.exists(path)) {
    if (!process_running(listener_pid)) {
      fail("server_listener.py (pid ", listener_pid, ") exited before writing ", path, "; its messages are above")
    }
    Sys.sleep(0.02)
  }
}

user_file <- function(variable, name) {
  # The file R would read at start-up: $variable if set, else `name` in the working directory, else in the home.
  set <- Sys.getenv(variable)
  found <- if (nzchar(set)) path.expand(set) else c(name, file.path(path.expand("~"), name))
  found <- found[file.exists(found)]
  if (length(found)) found[[1]] else NULL
}

read_startup_files <- function() {
  # Rscript runs with --no-environ --no-init-file, so that no user file (nor a package or site profile that one
  # names) runs before the listener holds the token. Read now what R would have read (?Startup): the site and the
  # user environ files, the library paths they set, then the user profile into the workspace, and its .First.
  site <- Sys.getenv("R_ENVIRON", file.path(R.home("etc"), "Renviron.site"))
  for (path in c(if (file.exists(site)) site, user_file("R_ENVIRON_USER", ".Renviron"))) readRenviron(path)
  expand <- if (exists(".expand_R_libs_env_var", baseenv())) get(".expand_R_libs_env_var", baseenv()) else identity
  paths <- function(variable) {
    value <- expand(Sys.getenv(variable))
    if (identical(value, "NULL")) character() else unlist(strsplit(value, ":"))
  }
  .libPaths(c(paths("R_LIBS"), paths("R_LIBS_USER"), paths("R_LIBS_SITE")))
  profile <- user_file("R_PROFILE_USER", ".Rprofile")
  if (!is.null(profile)) {
    tryCatch(sys.source(profile, envir = globalenv(), toplevel.env = globalenv()), error = function(e) {
      fail("the R profile ", profile, " failed: ", conditionMessage(e), ": fix it, or move it away")
    })
  }
  if (exists(".First", envir = globalenv(), inherits = FALSE)) get(".First", envir = globalenv())()
}

main <- function() {
  # Order: the listener first, with base R only, as it takes the token from our stdin; then the user's files; then
  # the checks of IRkernel (and SparkR), which the user's library paths may satisfy. The listener calls back once
  # IRkernel listens (--wait-for-ports), so any failure before that fails the start with this log's last lines.
  opts <- parse_args(commandArgs(trailingOnly = TRUE))
  mode <- opts[["spark-context-initialization-mode"]]
  connection_file <- connection_file_path(opts[["kernel-id"]])
  info_file <- if (mode != "none") sub("\\.json$", "-info.json", connection_file)
  unlink(connection_file)  # a stale one of an earlier launch must not be mistaken for ours
  listener <- start_listener(opts, connection_file, info_file)
  wait_for_token_taken(connection_file, listener)
  read_startup_files()
  if (!requireNamespace("IRkernel", quietly = TRUE)) {
    fail("IRkernel cannot be loaded by ", file.path(R.home("bin"), "R"), " on ", Sys.info()[["nodename"]],
         " (library paths: ", paste(.libPaths(), collapse = ", "), "): install it there, e.g. ",
         "apt-get install r-cran-irkernel, or install.packages('IRkernel') for this R")
  }
  if (mode != "none") {
    check_sparkr()
    setup_spark(mode, info_file)
  }
  wait_for_connection_file(connection_file, listener)
  say("kernel ", opts[["kernel-id"]], ": starting IRkernel with ", connection_file, " (listener pid ", listener, ")")
  IRkernel::main(connection_file)  # returns only if the kernel loop ends; shutdown_request quits R
}

main()
