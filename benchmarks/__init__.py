"""Benchmarks: each script keeps its command line (`python benchmarks/<name>.py ...`) and has a `run(...)`
function returning its figures, which the evaluate stage calls in process (`benchmarks/suite.py`)."""
