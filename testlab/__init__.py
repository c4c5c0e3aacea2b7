"""The test lab: real SSH hosts in network namespaces (`hostlab`), a Spark standalone cluster (`spark_cluster`),
a real `jupyter server` (`jupyter_rest`) and the gateway configured for them (`gateway`).

Tests, `bench/` and `examples/` import it from the repository root (`python -m bench.launch`, pytest's rootdir).
"""
