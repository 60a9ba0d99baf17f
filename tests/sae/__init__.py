"""Tests of `sae`'s modules (shared fixtures in tests/conftest.py, helpers in tests/helpers.py)."""
