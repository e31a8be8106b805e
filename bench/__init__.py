"""Benchmarks of the Shapley estimator (run as ``python -m bench.<name>``)."""
