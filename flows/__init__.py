"""Prefect flows: thin orchestration (retries, mapping, artifacts) around ``qsae`` functions."""
