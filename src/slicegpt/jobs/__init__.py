"""The jobs a user runs: each takes a config and returns a result; the CLI, sweep, the Python API and the benchmarks call them."""
