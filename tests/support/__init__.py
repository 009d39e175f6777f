"""Helpers for driving real guests from tests, benchmarks and the demo."""
