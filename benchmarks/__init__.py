"""moelora's benchmark suite: every contestant checked against the float64 reference, then
timed against the base linear on the same inputs in the same run.

    python -m benchmarks --help

Modules: cases (what is measured, at which sizes), ops (inputs, references, contestants),
harness (check, time, compare), report (JSON, markdown, plot), cli (the command).
`test_bench_pytest.py` is the pytest-benchmark view: `pytest benchmarks --benchmark-only`.
"""
