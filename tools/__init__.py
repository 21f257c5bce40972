"""Benchmarks and reports that print numbers and write JSON; run on demand, never in the test suite."""
