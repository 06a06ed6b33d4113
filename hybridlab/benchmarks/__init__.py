"""Benchmarks, one home: `hybridlab bench model|kernels|attention` and the measured objectives.

- `model`: training tokens/s, MFU and peak memory; decoding against context (`bench model`).
- `inference`: prefill tokens/s, decode ms/token, cache bytes at several contexts; used by
  `bench model`, `hybridlab eval` and the sweeps.
- `kernels`: the dispatcher of `bench kernels` (`ssd`, `mamba_parts`, `mamba2_block`) and
  `bench attention` (`attention`); these CUDA modules each have `run(json_path=None) -> list[dict]`,
  print a table and run alone (`python -m hybridlab.benchmarks.ssd`). The pytest-benchmark
  cases in tests/test_benchmarks.py time the same calls.

Importing this package imports nothing heavy; each module imports torch (and triton) itself.
"""
