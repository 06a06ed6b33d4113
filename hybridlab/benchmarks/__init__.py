"""Kernel benchmarks (CUDA): each module has `run(json_path=None) -> list[dict]` and prints a table.

`hybridlab bench kernels` runs `ssd` and `mamba_parts`; `hybridlab bench attention` runs
`attention`; the pytest-benchmark cases in tests/test_benchmarks.py time the same calls.
"""
