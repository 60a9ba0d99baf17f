"""Prefect flows: thin orchestration (retries, mapping, artifacts) around ``qsae`` functions.

The jobs log through stdlib loggers under ``qsae``; each flow module forwards them into the
run's logs (``flows.logs.forward_qsae_logs``), with or without ``PREFECT_LOGGING_EXTRA_LOGGERS``.
"""
