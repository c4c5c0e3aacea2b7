# spark_gateway: `make demo` runs the main job on this machine, `make test` runs the suite (installing what it needs).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
APT_PKGS := openssh-server openssh-client iproute2 procps util-linux nftables sudo r-base-core r-cran-irkernel \
            chromium chromium-driver
export PYTHONDONTWRITEBYTECODE := 1

SPARK35_VENV ?= .venv-spark35
TOREE_VERSION ?= 0.5.0
TOREE_CACHE ?= build/cache/toree-$(TOREE_VERSION)
export SG_SPARK35_VENV := $(abspath $(SPARK35_VENV))
.PHONY: install system-deps test demo demo-standalone demo-yarn bench lint clean specs spark35 yarn-lab

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[spark,test]'
	touch $@

# `make demo` needs only the package, pyspark and `jupyter execute` (not the test tools, not the Scala environment)
$(VENV)/.demo-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[spark,demo]'
	touch $@

# Scala kernels: Apache Toree 0.5 is built for Scala 2.12, so it needs Spark 3.x; the main .venv has pyspark 4.
# A second environment holds pyspark 3.5 and apache-toree (pip only; about 40 s). tests/test_scala_kernel.py uses it.
$(SPARK35_VENV)/.installed:
	test -x $(SPARK35_VENV)/bin/python || python3 -m venv $(SPARK35_VENV)
	$(SPARK35_VENV)/bin/python -m pip install -q 'pyspark==3.5.*' 'apache-toree==0.5.0'
	touch $@

spark35: $(SPARK35_VENV)/.installed  ## .venv-spark35: pyspark 3.5 + Apache Toree 0.5, for Scala kernels and their tests

# The YARN lab (testlab/yarn_lab.py): Hadoop YARN jars from Maven Central, copied once into a cache outside the repo.
# A second run only checks the stamp (the pom is the key): nothing is downloaded again.
YARN_LAB_DIR ?= $(HOME)/.cache/spark_gateway/yarn-3.5.0
export SG_YARN_JARS := $(YARN_LAB_DIR)/jars
$(YARN_LAB_DIR)/.installed: testlab/yarn/pom.xml
	mkdir -p $(YARN_LAB_DIR)
	rm -rf $(YARN_LAB_DIR)/jars.tmp
	cd testlab/yarn && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(YARN_LAB_DIR)/jars.tmp
	rm -rf $(YARN_LAB_DIR)/jars && mv $(YARN_LAB_DIR)/jars.tmp $(YARN_LAB_DIR)/jars
	cp testlab/yarn/pom.xml $@

yarn-lab: $(YARN_LAB_DIR)/.installed  ## Hadoop YARN 3.5.0 jars for the YARN lab (Maven; cached in ~/.cache/spark_gateway)

install: $(VENV)/.installed $(SPARK35_VENV)/.installed  ## a .venv with the package, Spark and the test tools

system-deps:  ## Debian packages the real test hosts need (sshd, ip, setsid; R and IRkernel for R kernels; Chromium for the JupyterLab test)
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: install system-deps $(TOREE_CACHE)/.fetched yarn-lab  ## the whole suite against real sshd hosts, Spark, YARN and Jupyter clients
	$(VENV)/bin/ruff check spark_gateway kernel-launchers testlab tests bench examples
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

demo: $(VENV)/.demo-installed  ## executes examples/*.ipynb through the provisioner on this machine
	$(PY) -m examples.demo

demo-standalone: install system-deps  ## the same notebooks on SSH hosts in namespaces, against a standalone cluster (root)
	$(PY) -m examples.demo --standalone

demo-yarn: install system-deps yarn-lab  ## the same notebooks on SSH hosts in namespaces, against a YARN cluster (root)
	$(PY) -m examples.demo --yarn

bench: install system-deps yarn-lab  ## benchmarks: ratios against references measured in the same run
	$(PY) -m bench.launch
	$(PY) -m bench.placement
	$(PY) -m bench.spark
	$(PY) -m bench.yarn
	$(PY) -m bench.scale
	$(PY) -m bench.connect

SPARK_MASTER ?=
SPECS_DIR ?= build/kernelspecs
DIST_DIR ?= dist
SPECS_OPTS ?=

# Scala specs carry Apache Toree's assembly jar: taken from PyPI's apache-toree sdist into a build cache (no Spark 3
# environment needed here). Toree 0.5 fits Spark 3.x (Scala 2.12); the specs and `make specs` say so.
$(TOREE_CACHE)/.fetched: | $(VENV)/.installed
	mkdir -p $(TOREE_CACHE)
	$(PIP) download -q --no-deps --no-binary=:all: --dest $(TOREE_CACHE) 'apache-toree==$(TOREE_VERSION)'
	$(PY) -m spark_gateway.specs extract-toree $(TOREE_CACHE)/apache[-_]toree-$(TOREE_VERSION).tar.gz $(TOREE_CACHE)
	touch $@

specs: $(VENV)/.installed $(TOREE_CACHE)/.fetched  ## every kernelspec for SPARK_MASTER (yarn, spark://HOST:PORT, local[*]): build/kernelspecs/, dist/
	@test -n "$(SPARK_MASTER)" || { echo "usage: make specs SPARK_MASTER=yarn|spark://HOST:PORT|local[*] [SPECS_OPTS='--spark-home=/opt/spark ...']" >&2; exit 2; }
	$(PY) -m spark_gateway.sshspec build --spark-master='$(SPARK_MASTER)' --output='$(SPECS_DIR)' --dist='$(DIST_DIR)' \
	  --toree-jar="$$(ls $(TOREE_CACHE)/toree-assembly-*.jar)" $(SPECS_OPTS)

lint: install
	$(VENV)/bin/ruff check spark_gateway kernel-launchers testlab tests bench examples
	$(VENV)/bin/ruff format --check spark_gateway kernel-launchers testlab tests bench examples

clean:
	rm -rf build dist .pytest_cache
