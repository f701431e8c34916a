"""Benchmarks comparing dask-serverless with Dask's own schedulers (and Ray when present).

Run ``python -m benchmarks --help`` from the repository root; see ``benchmarks/README.md``.
"""
