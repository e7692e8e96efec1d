"""Helpers for the tests, benchmarks and demo: tiny generated models, real server processes,
media, the emulated GPU (not used by the plugin)."""
