"""The pieces of the GPU suite (`benchmarks/gpu_suite.py`, which holds the plan and the entry point).

- `report`: the result document (JSON + Markdown), rewritten after every measurement, and its schema;
- `plan`: the time budget, dropping the least important rows when the rest no longer fits;
- `preflight`: correctness on the device before any timing;
- `kernel_timing`: the fused ops' device and host time against eager, compiled and a copy;
- `model`: the FLUX.1-dev-sized steps, generations and full-size checks;
- `host`: the GPU or why there is none, the packages that import, their versions;
- `targets`: the issue's targets with pass/fail, from a result document.
"""
