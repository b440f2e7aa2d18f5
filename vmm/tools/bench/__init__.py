"""Benchmarks: each prints a table against a reference measured in the same run and writes JSON.
`vmm bench exits` (exits.py) and `vmm bench conversions` (conversions.py)."""
