"""Benchmarks for SIP-lite (issue 5): `python -m bench [--quick]`. See bench/README.md."""
